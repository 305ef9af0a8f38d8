"""Which backend runs the model: IPEX when it imports and matches torch, else upstream;
OpenVINO IR when configured (model.backend openvino, serve_app/model/openvino/).

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
    name: str  # "ipex", "torch" or "openvino"
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


def _import_openvino() -> ModuleType:
    return importlib.import_module("openvino")


def select_backend(requested: str, torch_version: str, *, device: str = "cpu",
                   import_ipex: Callable[[], ModuleType] = _import_ipex,
                   import_openvino: Callable[[], ModuleType] = _import_openvino
                   ) -> BackendChoice:
    """requested: 'auto', 'ipex', 'torch' or 'openvino'. 'ipex' or 'openvino' that cannot
    be used is an error. 'auto' never picks openvino (see auto_rule_candidate)."""
    if requested == "torch":
        return BackendChoice("torch", "configured")
    if requested == "openvino":
        if device != "cpu":
            raise RuntimeError("backend 'openvino' is for CPU replicas; this replica has a GPU")
        try:
            openvino = import_openvino()
        except Exception as exc:
            raise RuntimeError(
                f"backend 'openvino' requested but openvino is not usable: "
                f"{type(exc).__name__}: {exc} (pip install -e '.[openvino]')") from exc
        version = getattr(openvino, "__version__", "unknown").split("-", 1)[0]
        return BackendChoice("openvino", f"configured; OpenVINO {version}", openvino)
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


# CPU classes (serve_app.model.cpu.CLASSES) where OpenVINO is expected to beat the torch
# backend with its levers: a hypothesis until measured on the Xeons (BENCHMARKS.md).
OPENVINO_CANDIDATE_CLASSES = frozenset({"amx"})


def auto_rule_candidate(cpu_class: str, *, ipex: BackendChoice, openvino_version: str | None,
                        ir_cached: bool) -> BackendChoice:
    """The rule `model.backend: auto` could follow once measured. NOT used by
    select_backend: auto keeps picking IPEX or torch until Xeon numbers decide.

    1. IPEX when it matches torch (as today): `ipex` is select_backend's auto choice.
    2. OpenVINO when it is installed, the IR for this model, versions and options is
       already cached (auto must never start a multi-GB export on its own), and the CPU's
       class is one where OpenVINO measured faster (OPENVINO_CANDIDATE_CLASSES).
    3. torch otherwise.
    """
    if ipex.name == "ipex":
        return ipex
    if openvino_version is None:
        return BackendChoice("torch", "candidate: openvino not installed")
    if cpu_class not in OPENVINO_CANDIDATE_CLASSES:
        classes = ", ".join(sorted(OPENVINO_CANDIDATE_CLASSES))
        return BackendChoice("torch", f"candidate: CPU {cpu_class} is not one where OpenVINO "
                                      f"measured faster ({classes})")
    if not ir_cached:
        return BackendChoice("torch", "candidate: no OpenVINO IR cached for this model "
                                      "(run sdxl-turbo-export)")
    return BackendChoice("openvino", f"candidate: OpenVINO {openvino_version} on CPU "
                                     f"{cpu_class} with the IR cached")
