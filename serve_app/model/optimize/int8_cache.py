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
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from serve_app.model.openvino.cache import model_fingerprint, not_writable_reason
from serve_app.model.optimize.int8 import KEEP_FLOAT, QMAX, load_int8

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


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def entry_for(root: Path, model_dir: str | Path, *, dtype: str, fuse_attention: bool) -> Path:
    material = {
        "format": FORMAT,
        "model": model_fingerprint(model_dir),
        "versions": {"torch": torch.__version__, "diffusers": _version("diffusers"),
                     "sdxl-turbo-serve": _version("sdxl-turbo-serve")},
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
        # A bias or scale may share storage with a kept tensor: save_file wants each alone.
        flat = {**{f"int8.{k}": v.contiguous().clone() for k, v in tensors.int8.items()},
                **{f"float.{k}": v.detach().contiguous().clone()
                   for k, v in tensors.floats.items()}}
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
