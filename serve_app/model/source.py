"""Resolve `model.source` to a local diffusers directory, or fail with one clear line."""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.config import EMBEDDED_MODELS, EMBEDDED_TINY


class ModelNotFoundError(RuntimeError):
    pass


def _how_to_provide(source: str) -> str:
    return (
        f"download it where the hub is reachable (`hf download {source} "
        f"--local-dir /models/sdxl-turbo`), copy or mount that directory here, and set "
        f"model.source to it; or use model.source: {EMBEDDED_TINY} for the random-weight "
        f"demo model"
    )


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.sep in source.strip("/").split(
        "/", 1)[0]


def check_local_source(source: str) -> None:
    """Cheap check for directory sources, where the weights are read (the model replica's
    load, the OpenVINO export), before anything is loaded."""
    if source in EMBEDDED_MODELS or not looks_like_path(source):
        return
    path = Path(source).expanduser()
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"model.source {source!r}: no diffusers model there (looked for "
            f"{path / 'model_index.json'}); {_how_to_provide('stabilityai/sdxl-turbo')}"
        )


def resolve_model_dir(source: str, revision: str | None = None,
                      cache_dir: str | None = None) -> Path:
    if source in EMBEDDED_MODELS:
        from serve_app.model.tiny_model import ensure_tiny_model

        return ensure_tiny_model(cache_dir, source.split(":", 1)[1])
    if looks_like_path(source):
        check_local_source(source)
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    try:
        # Uses the local HF cache first; only reaches the hub for what is missing.
        return Path(snapshot_download(
            source, revision=revision,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
            ignore_patterns=["*.fp16.safetensors", "*.onnx*", "*openvino*"],
        ))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model.source {source!r}: not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub could not be "
            f"reached ({type(exc).__name__}); {_how_to_provide(source)}"
        ) from None
