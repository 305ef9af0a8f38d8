"""Which backend runs the model: IPEX when it imports and matches torch, else upstream.

IPEX 2.8 is IPEX's last release and needs torch 2.8; with any other torch it either fails
to import or refuses to work, so it is gated on the major.minor version pair.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "ipex" or "torch"
    reason: str
    module: ModuleType | None = None


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _import_ipex() -> ModuleType:
    return importlib.import_module("intel_extension_for_pytorch")


def select_backend(requested: str, torch_version: str, *, device: str = "cpu",
                   import_ipex: Callable[[], ModuleType] = _import_ipex) -> BackendChoice:
    """requested: 'auto', 'ipex' or 'torch'. 'ipex' that cannot be used is an error."""
    if requested == "torch":
        return BackendChoice("torch", "configured")
    if device != "cpu":
        if requested == "ipex":
            raise RuntimeError("backend 'ipex' is for CPU replicas; this replica has a GPU")
        return BackendChoice("torch", f"device {device}")
    try:
        ipex = import_ipex()
    except Exception as exc:  # ImportError, or IPEX's own version check at import
        reason = f"intel_extension_for_pytorch not usable: {type(exc).__name__}: {exc}"
        if requested == "ipex":
            raise RuntimeError(f"backend 'ipex' requested but {reason}") from exc
        return BackendChoice("torch", reason)
    ipex_version = getattr(ipex, "__version__", "unknown")
    want, have = _major_minor(ipex_version), _major_minor(torch_version)
    if want is None or want != have:
        reason = f"IPEX {ipex_version} does not match torch {torch_version}"
        if requested == "ipex":
            raise RuntimeError(f"backend 'ipex' requested but {reason}")
        return BackendChoice("torch", reason)
    return BackendChoice("ipex", f"IPEX {ipex_version} matches torch {torch_version}", ipex)


def apply_ipex(choice: BackendChoice, pipe: Any, dtype: Any) -> None:
    """ipex.optimize the compute-heavy modules in place (inference mode)."""
    if choice.name != "ipex" or choice.module is None:
        return
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            setattr(pipe, name, choice.module.optimize(module.eval(), dtype=dtype, inplace=True))
