"""CPU capability detection and the dtype it chooses, from fake /proc/cpuinfo text."""

from __future__ import annotations

import pytest

from serve_app.model.cpu import CPU_CLASS_ENV, choose_dtype, detect, parse_flags

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c"
AVX2 = f"{BASE} avx2 fma bmi2"
AVX512 = f"{AVX2} avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
# Ice Lake / g7: AVX-512 without bf16.
ZEN5 = f"{AVX512} avx512_bf16 avx_vnni avx512_vbmi2"
SPR = f"{AVX512} avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"


def cpuinfo(flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\n"
            f"processor\t: 1\nflags\t\t: {flags}\n")


@pytest.mark.parametrize("flags,cpu_class,native,onednn", [
    (BASE, "baseline", False, False),
    (AVX2, "avx2", False, False),
    (AVX512, "avx512", False, True),
    (ZEN5, "avx512_bf16", True, True),
    (SPR, "amx", True, True),
    (f"{AVX2} avx_ne_convert", "avx2", False, True),
])
def test_class_and_bf16_support(flags, cpu_class, native, onednn):
    caps = detect(cpuinfo(flags), env={})
    assert (caps.cpu_class, caps.native_bf16, caps.onednn_bf16) == (cpu_class, native, onednn)
    assert caps.capped_to is None


def test_no_flags_line_is_baseline():
    assert parse_flags("Processor\t: AArch64\nFeatures\t: fp asimd\n") == frozenset()
    assert detect("", env={}).cpu_class == "baseline"


@pytest.mark.parametrize("auto_dtype,flags", [
    ("float32", BASE), ("float32", AVX2), ("float32", AVX512), ("bfloat16", ZEN5),
    ("bfloat16", SPR)])
def test_auto_dtype_follows_native_bf16(auto_dtype, flags):
    caps = detect(cpuinfo(flags), env={})
    choice = choose_dtype("auto", "cpu", caps)
    assert choice.name == auto_dtype and choice.warning is None
    assert choice.reason.startswith(f"auto: CPU {caps.cpu_class} has ")


def test_explicit_bfloat16_without_native_bf16_starts_with_a_warning():
    caps = detect(cpuinfo(AVX2), env={})
    choice = choose_dtype("bfloat16", "cpu", caps)
    assert (choice.name, choice.reason) == ("bfloat16", "configured")
    assert choice.warning is not None and "emulated" in choice.warning
    assert "model.dtype auto" in choice.warning
    native = choose_dtype("bfloat16", "cpu", detect(cpuinfo(SPR), env={}))
    assert (native.name, native.warning) == ("bfloat16", None)


def test_float32_is_kept_and_float16_refused_on_cpu():
    caps = detect(cpuinfo(SPR), env={})
    assert choose_dtype("float32", "cpu", caps).name == "float32"
    with pytest.raises(ValueError, match="1000x slower"):
        choose_dtype("float16", "cpu", caps)


@pytest.mark.parametrize("requested,expected", [
    ("auto", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32"),
    ("float16", "float16")])
def test_gpu_dtype(requested, expected):
    choice = choose_dtype(requested, "cuda", detect(cpuinfo(AVX2), env={}))
    assert (choice.name, choice.warning) == (expected, None)


@pytest.mark.parametrize("cap,cpu_class,native,onednn", [
    ("avx2", "avx2", False, False),
    ("avx512", "avx512", False, True),
    ("avx512_bf16", "avx512_bf16", True, True),
])
def test_cap_lowers_the_class_of_a_bigger_cpu(cap, cpu_class, native, onednn):
    caps = detect(cpuinfo(SPR), env={CPU_CLASS_ENV: cap})
    assert (caps.cpu_class, caps.native_bf16, caps.onednn_bf16) == (cpu_class, native, onednn)
    assert caps.capped_to == cap
    assert caps.describe() == f"{cpu_class}, capped by {CPU_CLASS_ENV}"
    assert "sse4_2" in caps.flags  # only flags above the cap go


def test_cap_never_raises_the_class():
    caps = detect(cpuinfo(AVX2), env={CPU_CLASS_ENV: "amx"})
    assert (caps.cpu_class, caps.capped_to, caps.native_bf16) == ("avx2", None, False)


def test_unknown_cap_is_refused():
    with pytest.raises(ValueError, match="expected one of baseline, avx2"):
        detect(cpuinfo(SPR), env={CPU_CLASS_ENV: "avx1024"})
