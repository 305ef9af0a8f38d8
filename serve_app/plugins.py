"""Functions named in the config as 'package.module:function' (model.generator,
security.tee_probe), loaded where they run. Shared by the model replicas and the TEE check,
so neither reaches into the other's package for it."""

from __future__ import annotations

import importlib
from typing import Any


def load_factory(import_path: str) -> Any:
    """'package.module:function' -> the function."""
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model.generator must be 'module:function', got {import_path!r}")
    return getattr(importlib.import_module(module_name), attr)
