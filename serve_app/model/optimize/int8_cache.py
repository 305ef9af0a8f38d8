"""The converted int8 UNet on disk (model.torch_int8_cache_dir), so that a restarted replica
reads the int8 layers instead of loading the UNet's float weights and converting them again
(on a 2-vCPU AVX2 host the two took most of a 47-55 s start: BENCHMARKS.md).

An entry is `<root>/<dtype>-<16 hex digits>/` holding `unet.safetensors` (each converted
layer's int8 weight, scales and bias; the UNet's remaining float tensors) and `entry.json`,
written last. The digits hash everything the tensors depend on: the model's files (as the
OpenVINO IR cache fingerprints them), torch, diffusers and this project's versions, the
dtype, the attention fusion (it changes which layers exist) and the conversion's own
parameters. A replica writes its entry into a staging directory and renames it into place,
so another replica never reads half an entry; when two write at once, the first rename wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serve_app.model.openvino.cache import (
    model_fingerprint,
    not_writable_reason,
    package_version,
)
from serve_app.model.optimize.int8 import KEEP_FLOAT, QMAX, int8_unusable, load_int8

logger = logging.getLogger(__name__)

# Bump when what an entry holds or how it is read changes.
FORMAT = 1
DEFAULT_SUBDIR = "torch-int8"
MARKER = "entry.json"
TENSORS = "unet.safetensors"


@dataclass
class Int8Tensors:
    """What quantize_int8 produced, to be written: the int8 layers' tensors (its sink) and the
    UNet's float tensors left beside them."""

    int8: dict[str, torch.Tensor] = field(default_factory=dict)
    floats: dict[str, torch.Tensor] = field(default_factory=dict)


def cache_root(model_dir: str | Path, configured: str | None) -> Path | None:
    """model.torch_int8_cache_dir, `torch-int8/` inside the model's directory when unset,
    or None when set to "" (off)."""
    if configured == "":
        return None
    if configured:
        return Path(configured).expanduser()
    return Path(model_dir) / DEFAULT_SUBDIR


def entry_for(root: Path, model_dir: str | Path, *, dtype: str, fuse_attention: bool) -> Path:
    material = {
        "format": FORMAT,
        "model": model_fingerprint(model_dir),
        "versions": {"torch": torch.__version__, "diffusers": package_version("diffusers"),
                     "sdxl-turbo-serve": package_version("sdxl-turbo-serve")},
        "options": {"dtype": dtype, "fuse_attention": fuse_attention,
                    "keep_float": list(KEEP_FLOAT), "qmax": QMAX},
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return root / f"{dtype}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def is_complete(entry: Path) -> bool:
    return (entry / MARKER).is_file() and (entry / TENSORS).is_file()


def write_entry(entry: Path, tensors: Int8Tensors) -> str | None:
    """Write `entry`; None when it is in place (written here or by another replica), else
    why it could not be written (the replica runs on; the next start converts again)."""
    from safetensors.torch import save_file

    if is_complete(entry):
        return None
    reason = not_writable_reason(entry.parent)
    if reason is not None:
        return f"{entry.parent} is not writable ({reason})"
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        # Written as they are: a copy of 2.5 GB would raise the first start's peak.
        flat = {**{f"int8.{k}": v.contiguous() for k, v in tensors.int8.items()},
                **{f"float.{k}": v.detach().contiguous() for k, v in tensors.floats.items()}}
        save_file(flat, str(staging / TENSORS))
        (staging / MARKER).write_text(json.dumps({"format": FORMAT, "layers": len(
            {k.rsplit(".", 1)[0] for k in tensors.int8})}))
        try:
            os.rename(staging, entry)
        except OSError:
            if not is_complete(entry):  # not another replica's finished entry: a failure
                raise
    except OSError as exc:
        return f"writing {entry} failed ({exc.strerror or type(exc).__name__})"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None


def load_unet(model_dir: str | Path, entry: Path, *, fuse_qkv: bool) -> Any:
    """The UNet from `entry`, without reading its float weights: built on the meta device
    from the model's config, q/k/v fused as the levers would (fuse_qkv), then every layer
    quantize_int8 converts taken from the entry and the rest assigned from it. Raises
    ValueError when the entry does not fit the model (nothing is left on the meta device)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from serve_app.model.optimize.attention import fuse_attention

    config = UNet2DConditionModel.load_config(str(model_dir), subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    if fuse_qkv:
        fuse_attention(unet, fuse_qkv=True)
    stored = load_file(str(entry / TENSORS))
    load_int8(unet, {k[len("int8."):]: v for k, v in stored.items() if k.startswith("int8.")})
    floats = {k[len("float."):]: v for k, v in stored.items() if k.startswith("float.")}
    try:
        unet.load_state_dict(floats, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"int8 cache entry {entry.name} does not fit the model: "
                         f"{str(exc).splitlines()[0]}") from exc
    on_meta = [name for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]
               if tensor.is_meta]
    if on_meta:
        raise ValueError(f"int8 cache entry {entry.name} leaves {on_meta[:3]} unset")
    return unet.eval().requires_grad_(False)


@dataclass
class Int8CacheUse:
    """A replica's use of the cache (pipeline.load_generator): the UNet read from it (a
    hit), or what to write there after the conversion (a miss), or why it is not used."""

    entry: Path | None
    unet: Any = None
    sink: Any = None
    skipped: str | None = None

    @classmethod
    def open(cls, model_cfg: Any, model_dir: str | Path,
             dtype_name: str) -> Int8CacheUse | None:
        if model_cfg.loras:  # adapters are fused into the weights: not what the key covers
            return cls(None, skipped="not with LoRA adapters (fused into the weights)")
        root = cache_root(model_dir, model_cfg.torch_int8_cache_dir)
        if root is None or int8_unusable() is not None:
            return None  # turned off; or no int8 layers at all (reported as skipped)
        fuse_qkv = model_cfg.optimization.fuse_attention
        entry = entry_for(root, model_dir, dtype=dtype_name, fuse_attention=fuse_qkv)
        if is_complete(entry):
            try:
                return cls(entry, unet=load_unet(model_dir, entry, fuse_qkv=fuse_qkv))
            except Exception as exc:  # a torn or foreign file: the float weights still work
                logger.warning("int8 cache entry %s unusable (%s); converting again",
                               entry, exc)
        return cls(entry, sink=Int8Tensors())

    def finish(self, applied: list[str], skipped: dict[str, str]) -> None:
        """After the levers: write the entry on a miss; report the cache either way."""
        if "int8_unet" not in applied:
            return
        if self.entry is not None and self.sink is not None:
            self.skipped = write_entry(self.entry, self.sink)
            self.sink = None  # its tensors are on disk now: free them
        if self.skipped is not None:
            skipped["int8_cache"] = self.skipped
            logger.warning("int8 cache not used: %s", self.skipped)
        else:
            applied.append("int8_cache")

    def describe(self) -> dict[str, Any]:
        return {"entry": None if self.entry is None else str(self.entry),
                "hit": self.unet is not None}
