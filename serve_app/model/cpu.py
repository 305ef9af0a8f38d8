"""What this CPU can run fast, read from /proc/cpuinfo: the dtype, and the oneDNN levers.

bfloat16 is fast only with native bf16 arithmetic (AMX on Sapphire/Emerald Rapids, such as
g8i; `avx512_bf16` on Cooper Lake, Zen 4/5). Elsewhere torch emulates it: a full-size UNet
step took over 5 minutes in bfloat16 against 14 s in float32 on an AVX2-only EPYC
(BENCHMARKS.md). oneDNN's bf16 kernels, which the prepacked levers call, refuse to run
without avx512bw/vl/dq or avx_ne_convert.

`SDXL_SERVE_CPU_CLASS` (one of CLASSES) caps what is detected, never raises it: it makes a
bigger CPU behave as a smaller one, for tests and benchmarks. Set `ONEDNN_MAX_CPU_ISA=AVX2`
and `ATEN_CPU_CAPABILITY=avx2` beside `SDXL_SERVE_CPU_CLASS=avx2` and torch's own kernels
follow too (that is how CI runs the AVX2 case on an AVX-512 host).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CPU_CLASS_ENV = "SDXL_SERVE_CPU_CLASS"
# Smallest to biggest.
CLASSES = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")
_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


def _class_of(flags: frozenset[str]) -> str:
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if _AVX512_CORE <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "baseline"


def _above(cap: str, flag: str) -> bool:
    """Whether `flag` belongs to a class above `cap` (so a cap removes it)."""
    rank = CLASSES.index(cap)
    if flag.startswith("amx"):
        return rank < CLASSES.index("amx")
    if flag == "avx512_bf16":
        return rank < CLASSES.index("avx512_bf16")
    if flag.startswith("avx512") or flag == "avx_ne_convert":
        return rank < CLASSES.index("avx512")
    if flag in ("avx2", "fma"):
        return rank < CLASSES.index("avx2")
    return False


@dataclass(frozen=True)
class CpuCapabilities:
    flags: frozenset[str]
    # The class SDXL_SERVE_CPU_CLASS capped detection to, when it did.
    capped_to: str | None = None

    @property
    def cpu_class(self) -> str:
        return _class_of(self.flags)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware: bfloat16 is then the fast dtype."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def onednn_bf16(self) -> bool:
        """oneDNN's bf16 kernels run (natively or by its own AVX-512 emulation)."""
        return _AVX512_CORE <= self.flags or "avx_ne_convert" in self.flags

    def describe(self) -> str:
        capped = f", capped by {CPU_CLASS_ENV}" if self.capped_to else ""
        return f"{self.cpu_class}{capped}"


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The first processor's `flags` line (x86); empty elsewhere."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def detect(cpuinfo: str | None = None,
           env: Mapping[str, str] | None = None) -> CpuCapabilities:
    env = os.environ if env is None else env
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = parse_flags(cpuinfo)
    cap = env.get(CPU_CLASS_ENV, "").strip()
    if not cap:
        return CpuCapabilities(flags)
    if cap not in CLASSES:
        raise ValueError(f"{CPU_CLASS_ENV}={cap!r}: expected one of {', '.join(CLASSES)}")
    if CLASSES.index(cap) >= CLASSES.index(_class_of(flags)):
        return CpuCapabilities(flags)  # a cap above the CPU changes nothing
    return CpuCapabilities(frozenset(f for f in flags if not _above(cap, f)), capped_to=cap)


@functools.cache
def host() -> CpuCapabilities:
    return detect()


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # "bfloat16", "float32" or "float16"
    reason: str
    # Set when the configured dtype will run slowly here (logged once, shown by /readyz).
    warning: str | None = None


def choose_dtype(requested: str, device: str, caps: CpuCapabilities) -> DtypeChoice:
    """requested: "auto", "bfloat16", "float32" or "float16" (model.dtype)."""
    if device != "cpu":
        if requested == "auto":
            return DtypeChoice("float16", f"auto: {device}")
        return DtypeChoice(requested, "configured")
    if requested == "float16":
        raise ValueError("float16 on CPU is ~1000x slower than bfloat16 or float32: "
                         "use model.dtype auto")
    if requested == "auto":
        if caps.native_bf16:
            return DtypeChoice("bfloat16", f"auto: CPU {caps.describe()} has native bf16")
        return DtypeChoice("float32", f"auto: CPU {caps.describe()} has no native bf16 "
                                      "(amx_bf16 or avx512_bf16); bfloat16 would be emulated")
    if requested == "bfloat16" and not caps.native_bf16:
        return DtypeChoice("bfloat16", "configured", warning=(
            f"model.dtype bfloat16 on CPU {caps.describe()} without native bf16 "
            "(amx_bf16 or avx512_bf16): emulated, many times slower than float32; "
            "use model.dtype auto"))
    return DtypeChoice(requested, "configured")
