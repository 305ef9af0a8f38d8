"""model.vae tiny: an AutoencoderTiny (TAESDXL) decodes the latents, and encodes
image-to-image inputs, instead of the model's AutoencoderKL.

Its source is resolved like the main weights (serve_app/model/source.py): the embedded
random-weight one, a local directory, or a hub id from the local Hugging Face cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from serve_app.config import EMBEDDED_TINY_VAE, TAESDXL
from serve_app.model.source import ModelNotFoundError, looks_like_path


def check_local_tiny_vae(source: str) -> None:
    """Cheap start-up check for a directory source; runs before any replica starts."""
    if source == EMBEDDED_TINY_VAE or not looks_like_path(source):
        return
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model.tiny_vae_source {source!r}: no AutoencoderTiny there (looked for "
            f"{path / 'config.json'}); download it where the hub is reachable (`hf download "
            f"{TAESDXL} --local-dir /models/taesdxl`) and point model.tiny_vae_source at it")


def resolve_tiny_vae_dir(source: str, revision: str | None = None,
                         cache_dir: str | None = None) -> Path:
    if source == EMBEDDED_TINY_VAE:
        from serve_app.model.tiny_model import ensure_tiny_vae

        return ensure_tiny_vae(cache_dir)
    if looks_like_path(source):
        check_local_tiny_vae(source)
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model.tiny_vae_source {source!r}: not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub could not be "
            f"reached ({type(exc).__name__}); download it where the hub is reachable (`hf "
            f"download {source} --local-dir /models/taesdxl`) and set model.tiny_vae_source "
            f"to that directory") from None


def load_tiny_vae(path: str | Path, dtype: Any) -> Any:
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
