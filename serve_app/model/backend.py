"""Which backend runs the model: IPEX when it imports and matches torch; else OpenVINO IR
(serve_app/model/openvino/) when configured, or for `auto` on the CPU classes where it
measured fastest; else upstream torch.

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

from serve_app.config import FAST_TORCH_INT8_MEASURED

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
                   cpu_class: str | None = None, profile: str = "quality",
                   import_ipex: Callable[[], ModuleType] = _import_ipex,
                   import_openvino: Callable[[], ModuleType] = _import_openvino
                   ) -> BackendChoice:
    """requested: 'auto', 'ipex', 'torch' or 'openvino'. 'ipex' or 'openvino' that cannot
    be used is an error. 'auto' on CPU: IPEX when it matches torch (someone installed the
    `ipex` extra on purpose), else OpenVINO where it measured fastest for `cpu_class`
    (OPENVINO_MEASURED_FASTER) and imports, else torch. With profile 'fast', 'auto' runs
    torch on the classes where its int8 UNet layers measured faster than OpenVINO's fast
    pick (serve_app.config.FAST_TORCH_INT8_MEASURED)."""
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
        return _auto_without_ipex(reason, requested, cpu_class, import_openvino, profile)
    ipex_version = getattr(ipex, "__version__", "unknown")
    want, have = _major_minor(ipex_version), _major_minor(torch_version)
    if want is None or want != have:
        reason = f"IPEX {ipex_version} does not match torch {torch_version}"
        if requested == "ipex":
            raise RuntimeError(f"backend 'ipex' requested but {reason}")
        return _auto_without_ipex(reason, requested, cpu_class, import_openvino, profile)
    return BackendChoice("ipex", f"IPEX {ipex_version} matches torch {torch_version}", ipex)


def _auto_without_ipex(ipex_reason: str, requested: str, cpu_class: str | None,
                       import_openvino: Callable[[], ModuleType],
                       profile: str = "quality") -> BackendChoice:
    if requested == "auto" and profile == "fast" and cpu_class in FAST_TORCH_INT8_MEASURED:
        return BackendChoice("torch", f"auto, profile fast: torch with int8 UNet layers "
                                      f"measured fastest on {cpu_class} CPUs "
                                      f"({FAST_TORCH_INT8_MEASURED[cpu_class]})")
    if requested == "auto" and cpu_class is not None:
        openvino, why_not = _auto_openvino(cpu_class, import_openvino)
        if openvino is not None:
            return openvino
        return BackendChoice("torch", f"auto: {why_not}; {ipex_reason}")
    return BackendChoice("torch", ipex_reason)


def apply_ipex(choice: BackendChoice, pipe: Any, dtype: Any) -> None:
    """ipex.optimize the compute-heavy modules in place (inference mode)."""
    if choice.name != "ipex" or choice.module is None:
        return
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            setattr(pipe, name, choice.module.optimize(module.eval(), dtype=dtype, inplace=True))


# CPU classes (serve_app.model.cpu.CLASSES) where OpenVINO measured fastest, and the
# measurement (BENCHMARKS.md, "Backends"). `auto` picks OpenVINO there when it is installed;
# on the classes not listed nobody has measured it yet, and `auto` keeps torch.
OPENVINO_MEASURED_FASTER: dict[str, str] = {
    "avx2": "UNet step float32 1.42x torch eager (AMD EPYC, AVX2 only)",
    "avx512_bf16": "512x512 bfloat16 1.15x torch eager and torch with levers, 1024x1024 "
                   "1.33x torch with levers (AMD EPYC Zen 5)",
}


def _auto_openvino(cpu_class: str | None, import_openvino: Callable[[], ModuleType]
                   ) -> tuple[BackendChoice | None, str]:
    """The OpenVINO choice `auto` makes on this CPU class, or (None, why not)."""
    if cpu_class not in OPENVINO_MEASURED_FASTER:
        return None, f"OpenVINO not measured on {cpu_class} CPUs"
    try:
        openvino = import_openvino()
    except Exception as exc:
        return None, f"openvino not installed ({type(exc).__name__})"
    version = getattr(openvino, "__version__", "unknown").split("-", 1)[0]
    return BackendChoice("openvino", f"auto: OpenVINO {version} measured fastest on "
                                     f"{cpu_class} CPUs ({OPENVINO_MEASURED_FASTER[cpu_class]})",
                         openvino), ""
