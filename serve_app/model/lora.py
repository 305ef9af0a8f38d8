"""LoRA adapters on a model (`loras:` of a model entry), with diffusers' LoRA support (peft).

Each adapter is loaded with `load_lora_weights`, weighted by its `scale` (`set_adapters`),
fused into the base weights (`fuse_lora`) and its LoRA layers then removed
(`unload_lora_weights`): the pipeline that results has plain nn.Linear modules holding
base + scale * B @ A, so the CPU levers (prepacked weights, fused q/k/v, serve_app/model/
optimize/) apply to it unchanged and a call costs what a call of the base model costs.
Fused, not switched per batch: measured in BENCHMARKS.md ("LoRA adapters"); a model id
with adapters is its own pipeline in the replica's model cache.

Sources: a hub id (the Hugging Face cache, as model.source), a local directory (with
`weight_name` when it holds several files), a local .safetensors file, or an embedded
random-weight adapter for the embedded tiny model (`embedded:tiny-lora-a`,
`embedded:tiny-lora-b`), generated offline with a fixed seed like the model itself
(serve_app/model/tiny_model.py), so tests and the quick start need no hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from serve_app.model.source import looks_like_path

logger = logging.getLogger(__name__)

TINY_LORA_VERSION = "v1"
# The embedded adapters: name -> weights seed. Rank 4 on the UNet's attention projections.
EMBEDDED_LORAS = {"embedded:tiny-lora-a": 1, "embedded:tiny-lora-b": 2}
TINY_LORA_RANK = 4
# The layers SDXL LoRAs train most often (kohya's and diffusers' default targets).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class LoraSpec(Protocol):
    """What a `loras:` entry says (serve_app.config.LoraConfig)."""

    source: str
    weight_name: str | None
    scale: float
    adapter_name: str | None


class LoraError(RuntimeError):
    """An adapter that cannot be loaded or cannot run on the configured backend."""


def lora_backend_reason(backend: str) -> str:
    """Why a model with `loras` does not run on `backend` (only torch and IPEX run them)."""
    return (f"LoRA adapters run on the torch backends (torch, ipex), not on backend "
            f"{backend!r}: an exported OpenVINO IR holds the base model's weights only")


def random_lora_state_dict(unet: Any, *, rank: int, seed: int, b_std: float,
                           targets: Sequence[str] = ATTENTION_TARGETS) -> dict[str, Any]:
    """A LoRA for `unet` in diffusers' format (`unet.<module>.lora_A.weight`, ...), with
    random A (N(0, 1/in_features)) and B (N(0, b_std^2)): trained LoRAs start B at zero, a
    random B makes the adapter change the image. Works on a meta-device UNet (shapes only),
    so a full-size adapter needs no full-size weights."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        fan_in, fan_out = module.in_features, module.out_features
        state[f"unet.{name}.lora_A.weight"] = (
            torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5)
        state[f"unet.{name}.lora_B.weight"] = torch.randn(fan_out, rank,
                                                          generator=generator) * b_std
    return state


def ensure_tiny_lora(source: str, cache_dir: str | Path | None = None) -> Path:
    """The directory of an embedded adapter for the embedded tiny model, generated once
    (atomically: several replicas may start at once)."""
    from serve_app.model.tiny_model import default_cache_dir, ensure_tiny_model

    seed = EMBEDDED_LORAS[source]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"{source.split(':', 1)[1]}-{TINY_LORA_VERSION}"
    if (target / WEIGHT_NAME).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("generating the embedded LoRA %s in %s", source, target)
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model(cache_dir) / "unet")
    state = random_lora_state_dict(unet, rank=TINY_LORA_RANK, seed=seed, b_std=0.5)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-lora-", dir=root))
    try:
        StableDiffusionXLPipeline.save_lora_weights(
            staging, unet_lora_layers={k.removeprefix("unet."): v for k, v in state.items()},
            weight_name=WEIGHT_NAME)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / WEIGHT_NAME).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_lora(lora: LoraSpec, cache_dir: str | None = None) -> tuple[str, str | None]:
    """(what load_lora_weights takes: a directory or a hub id, the weight file's name)."""
    if lora.source.startswith("embedded:"):
        if lora.source not in EMBEDDED_LORAS:
            raise LoraError(f"LoRA source {lora.source!r}: no such embedded adapter (there "
                            f"are {', '.join(sorted(EMBEDDED_LORAS))})")
        return str(ensure_tiny_lora(lora.source, cache_dir)), WEIGHT_NAME
    if looks_like_path(lora.source):
        path = Path(lora.source).expanduser()
        if path.is_file():
            return str(path.parent), path.name
        if not path.is_dir():
            raise LoraError(f"LoRA source {lora.source!r}: no such file or directory")
        return str(path), lora.weight_name
    return lora.source, lora.weight_name


def adapter_names(loras: Sequence[LoraSpec]) -> list[str]:
    return [lora.adapter_name or f"lora{index}" for index, lora in enumerate(loras)]


def apply_loras(pipe: Any, loras: Sequence[LoraSpec], cache_dir: str | None = None
                ) -> list[dict[str, Any]]:
    """Load, weight and fuse `loras` into `pipe` in place, then drop the LoRA layers.
    Returns what /readyz shows per adapter. Call it before the CPU levers (they rewrite the
    Linear modules the adapters target)."""
    if not loras:
        return []
    names = adapter_names(loras)
    applied: list[dict[str, Any]] = []
    for name, lora in zip(names, loras):
        started = time.perf_counter()
        where, weight_name = resolve_lora(lora, cache_dir)
        kwargs = {"weight_name": weight_name} if weight_name else {}
        try:
            pipe.load_lora_weights(where, adapter_name=name, **kwargs)
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LoraError(f"LoRA source {lora.source!r}: could not be loaded "
                            f"({type(exc).__name__}: {detail[:300]})") from None
        applied.append({"source": lora.source, "adapter_name": name, "scale": lora.scale,
                        "load_s": round(time.perf_counter() - started, 3)})
    started = time.perf_counter()
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    logger.info("LoRA adapters %s fused in %.2fs", names, time.perf_counter() - started)
    return applied
