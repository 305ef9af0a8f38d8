"""Optimised pipeline vs plain diffusers eager on the tiny model, at equal seeds, in the
dtype `model.dtype: auto` picks on this CPU (bf16 where native, float32 elsewhere).

Tolerance on uint8 RGB output (see BENCHMARKS.md): mean |diff| <= 0.5 and max |diff| <= 8.
Measured in bf16: 0.27 mean and 3 max for every lever that reorders bf16 arithmetic; exactly
0 for fuse_attention, the cross-attention K/V cache and the prompt cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from serve_app.config import OptimizationConfig
from serve_app.model import cpu
from serve_app.model.diffusers_generator import DiffusersGenerator
from serve_app.model.optimize import PackedConv2d, PackedLinear, optimize_pipeline
from serve_app.protocol import GenerationItem
from tests.optimize.conftest import skip_unless_onednn_runs

MEAN_TOLERANCE = 0.5
MAX_TOLERANCE = 8
LEVERS = ("channels_last", "prepack_linear", "prepack_conv", "fuse_geglu", "fuse_attention",
          "cross_attention_kv_cache")
ALL_OFF = dict({name: False for name in LEVERS}, prompt_cache_size=0)
DEFAULTS_APPLIED = ["fuse_attention", "cross_attention_kv_cache", "fuse_geglu",
                    "prepack_linear", "channels_last", "prepack_conv", "prompt_cache"]
ONEDNN_LEVERS = ("fuse_geglu", "prepack_linear", "prepack_conv")
ITEMS = [GenerationItem("a red cat", 128, 128, steps=2, seed=1, count=2),
         GenerationItem("a blue dog", 128, 128, steps=2, seed=2)]


def load(model_dir, dtype):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> np.ndarray:
    generator = DiffusersGenerator(pipe, device="cpu", dtype=pipe.unet.dtype, info={})
    return np.stack([img for group in generator.generate(ITEMS) for img in group])


_EAGER: dict[torch.dtype, np.ndarray] = {}


def eager_at(model_dir, dtype) -> np.ndarray:
    if dtype not in _EAGER:
        _EAGER[dtype] = images(load(model_dir, dtype))
    return _EAGER[dtype]


@pytest.fixture(scope="module")
def eager_images(tiny_model_dir, auto_dtype):
    return eager_at(tiny_model_dir, auto_dtype)


def module_types(pipe) -> list[str]:
    return [type(m).__name__ for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            for m in getattr(pipe, name).modules()]


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_all_off_changes_nothing(tiny_model_dir, eager_images, auto_dtype):
    pipe = load(tiny_model_dir, auto_dtype)
    before = module_types(pipe)
    report = optimize_pipeline(pipe, OptimizationConfig(**ALL_OFF))
    assert (report.applied, report.skipped) == ([], {})
    assert module_types(pipe) == before
    assert "encode_prompt" not in pipe.__dict__
    assert np.array_equal(images(pipe), eager_images)


@pytest.mark.parametrize("lever", LEVERS + ("prompt_cache_size",))
def test_each_lever_alone_within_tolerance(tiny_model_dir, eager_images, auto_dtype, lever):
    """At the auto dtype every lever runs on every CPU class (oneDNN has fp32 kernels
    everywhere, and bf16 is only picked where its kernels are native)."""
    pipe = load(tiny_model_dir, auto_dtype)
    options = dict(ALL_OFF, **{lever: 8 if lever == "prompt_cache_size" else True})
    report = optimize_pipeline(pipe, OptimizationConfig(**options))
    assert report.applied == ["prompt_cache" if lever == "prompt_cache_size" else lever]
    assert report.skipped == {}
    first, second = images(pipe), images(pipe)  # the second run hits the prompt cache
    for out in (first, second):
        d = diff(out, eager_images)
        assert d.mean() <= MEAN_TOLERANCE and d.max() <= MAX_TOLERANCE, (lever, d.mean(), d.max())
    if lever in ("fuse_attention", "cross_attention_kv_cache", "prompt_cache_size"):
        assert np.array_equal(first, eager_images)  # same arithmetic, bit for bit
    assert np.array_equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_defaults_apply_everything_within_tolerance(tiny_model_dir, dtype):
    skip_unless_onednn_runs(dtype)
    eager_images = eager_at(tiny_model_dir, dtype)
    pipe = load(tiny_model_dir, dtype)
    report = optimize_pipeline(pipe, OptimizationConfig())
    assert (report.applied, report.skipped) == (DEFAULTS_APPLIED, {})
    assert not any(type(m) is nn.Linear for m in pipe.unet.modules())
    assert not any(type(m) is nn.Conv2d for m in pipe.vae.modules())
    assert any(isinstance(m, PackedLinear) for m in pipe.text_encoder_2.modules())
    assert any(isinstance(m, PackedConv2d) for m in pipe.unet.modules())
    d = diff(images(pipe), eager_images)
    assert d.mean() <= MEAN_TOLERANCE and d.max() <= MAX_TOLERANCE, (d.mean(), d.max())
    # Applying twice does not wrap the prompt cache twice.
    assert "prompt_cache" not in optimize_pipeline(pipe, OptimizationConfig(**dict(
        ALL_OFF, prompt_cache_size=8))).applied


def test_bf16_on_a_cpu_without_onednn_bf16_skips_those_levers_with_the_reason(
        tiny_model_dir, monkeypatch, caplog):
    """model.dtype bfloat16 set by hand on an AVX2 CPU: the oneDNN levers are skipped and
    reported, the others still apply, and the images stay within tolerance. The CPU is
    capped to AVX2 here, so this runs the same on every host."""
    avx2 = cpu.detect(env={cpu.CPU_CLASS_ENV: "avx2"})
    assert not avx2.onednn_bf16
    monkeypatch.setattr(cpu, "host", lambda: avx2)
    eager_images = eager_at(tiny_model_dir, torch.bfloat16)
    pipe = load(tiny_model_dir, torch.bfloat16)
    with caplog.at_level("WARNING", logger="serve_app.model.optimize"):
        report = optimize_pipeline(pipe, OptimizationConfig())
    assert report.applied == ["fuse_attention", "cross_attention_kv_cache", "channels_last",
                              "prompt_cache"]
    assert list(report.skipped) == list(ONEDNN_LEVERS)
    reason = report.skipped["prepack_linear"]
    assert reason.startswith("oneDNN bf16 kernels need avx512bw/vl/dq or avx_ne_convert; "
                             f"CPU is {avx2.describe()}")
    assert f"skipping fuse_geglu, prepack_linear, prepack_conv: {reason}" in caplog.text
    assert not any(isinstance(m, PackedLinear | PackedConv2d) for name in
                   ("unet", "vae", "text_encoder", "text_encoder_2")
                   for m in getattr(pipe, name).modules())
    d = diff(images(pipe), eager_images)
    assert d.mean() <= MEAN_TOLERANCE and d.max() <= MAX_TOLERANCE, (d.mean(), d.max())


def test_tiny_vae_is_opt_in_and_loads_from_a_directory(tiny_model_dir, tmp_path, auto_dtype):
    """The benchmark's tiny-VAE switch (a replica's is model.vae: tiny, off by default)."""
    from diffusers import AutoencoderTiny

    from serve_app.bench.full_model import save_random_tiny_vae
    from serve_app.config import ModelConfig

    assert ModelConfig().resolved_vae == "full"
    path = save_random_tiny_vae(tmp_path / "taesdxl")
    pipe = load(tiny_model_dir, auto_dtype)
    report = optimize_pipeline(pipe, OptimizationConfig(**ALL_OFF), tiny_vae=str(path))
    assert report.applied == ["tiny_vae"] and isinstance(pipe.vae, AutoencoderTiny)
    out = images(pipe)  # random decoder weights: only the shape is meaningful
    assert out.shape == (3, 128, 128, 3) and out.dtype == np.uint8


def test_ipex_backend_leaves_weights_to_ipex(tiny_model_dir, auto_dtype):
    pipe = load(tiny_model_dir, auto_dtype)
    before = module_types(pipe)
    report = optimize_pipeline(pipe, OptimizationConfig(), backend="ipex")
    assert (report.applied, report.skipped) == (["channels_last", "prompt_cache"], {})
    assert module_types(pipe) == before


def test_replica_loader_picks_the_dtype_by_cpu_and_warns_on_emulated_bf16(
        tiny_model_dir, monkeypatch, caplog):
    """load_generator on the torch backend, as a replica runs it, on a CPU capped to AVX2:
    dtype `auto` gives float32 with every lever; an explicit bfloat16 starts, warns once, and
    reports what it skipped. (backend `auto` runs OpenVINO on avx2: test_openvino.py.)"""
    from serve_app.config import AppConfig
    from serve_app.model.pipeline import load_generator

    avx2 = cpu.detect(env={cpu.CPU_CLASS_ENV: "avx2"})
    monkeypatch.setattr(cpu, "host", lambda: avx2)
    base = {"model": {"source": str(tiny_model_dir), "warmup_sizes": [], "backend": "torch"},
            "replica": {"num_cpus": 1}}
    auto = load_generator(AppConfig.model_validate(base)).info
    # On an AVX2-only host the cap changes nothing, and the CPU is described as it is.
    described = ("avx2" if cpu.detect(env={}).cpu_class == "avx2"
                 else "avx2, capped by SDXL_SERVE_CPU_CLASS")
    assert (auto["dtype"], auto["cpu"], auto["warnings"]) == ("float32", described, [])
    assert auto["dtype_reason"].startswith(f"auto: CPU {described} has no native bf16")
    assert (auto["optimizations"], auto["optimizations_skipped"]) == (DEFAULTS_APPLIED, {})

    base["model"]["dtype"] = "bfloat16"
    with caplog.at_level("WARNING"):
        forced = load_generator(AppConfig.model_validate(base)).info
    assert (forced["dtype"], forced["dtype_reason"]) == ("bfloat16", "configured")
    (warning,) = forced["warnings"]
    assert "without native bf16 (amx_bf16 or avx512_bf16): emulated" in warning
    assert caplog.text.count(warning) == 1
    assert list(forced["optimizations_skipped"]) == list(ONEDNN_LEVERS)


EDIT_ITEMS = [GenerationItem("a red cat", 128, 128, steps=4, seed=1, count=2,
                             init_image=b"in", strength=0.5),
              GenerationItem("a blue dog", 128, 128, steps=4, seed=2, init_image=b"in",
                             strength=0.5)]


def edit_images(pipe) -> np.ndarray:
    """Image-to-image through the pipeline built with from_pipe over `pipe`'s modules
    (its VAE encoder runs too: diffusers upcasts the VAE to float32 for it and back)."""
    generator = DiffusersGenerator(pipe, device="cpu", dtype=pipe.unet.dtype, info={})
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in EDIT_ITEMS]
    return np.stack([img for group in generator.generate(EDIT_ITEMS, init_images=inputs)
                     for img in group])


def test_image_to_image_with_the_default_levers_matches_eager(tiny_model_dir, auto_dtype):
    skip_unless_onednn_runs(auto_dtype)
    eager = edit_images(load(tiny_model_dir, auto_dtype))
    pipe = load(tiny_model_dir, auto_dtype)
    report = optimize_pipeline(pipe, OptimizationConfig())
    assert report.applied == DEFAULTS_APPLIED
    optimised = edit_images(pipe)
    # measured 2026-11-25 (avx512_bf16 host): bf16 mean 0.41, max 4; float32 0.000, max 1
    d = diff(optimised, eager)
    assert d.mean() <= MEAN_TOLERANCE and d.max() <= MAX_TOLERANCE, (d.mean(), d.max())
    # seeded: the same bytes again on the same pipeline
    assert np.array_equal(edit_images(pipe), optimised)
