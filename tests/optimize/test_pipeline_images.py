"""Optimised pipeline vs plain diffusers eager bf16 on the tiny model, at equal seeds.

Tolerance on uint8 RGB output (see BENCHMARKS.md): mean |diff| <= 0.5 and max |diff| <= 8.
Measured here: 0.27 mean and 3 max for every lever that reorders bf16 arithmetic; exactly 0
for fuse_attention, the cross-attention K/V cache and the prompt cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from serve_app.batching import GenerationItem
from serve_app.config import OptimizationConfig
from serve_app.optimize import PackedConv2d, PackedLinear, optimize_pipeline
from serve_app.pipeline import DiffusersGenerator

MEAN_TOLERANCE = 0.5
MAX_TOLERANCE = 8
LEVERS = ("channels_last", "prepack_linear", "prepack_conv", "fuse_geglu", "fuse_attention",
          "cross_attention_kv_cache")
ALL_OFF = dict({name: False for name in LEVERS}, prompt_cache_size=0)
ITEMS = [GenerationItem("a red cat", 128, 128, steps=2, seed=1, count=2),
         GenerationItem("a blue dog", 128, 128, steps=2, seed=2)]


def load(model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> np.ndarray:
    generator = DiffusersGenerator(pipe, device="cpu", dtype=torch.bfloat16, info={})
    return np.stack([img for group in generator.generate(ITEMS) for img in group])


@pytest.fixture(scope="module")
def eager_images(tiny_model_dir):
    return images(load(tiny_model_dir))


def module_types(pipe) -> list[str]:
    return [type(m).__name__ for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            for m in getattr(pipe, name).modules()]


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_all_off_changes_nothing(tiny_model_dir, eager_images):
    pipe = load(tiny_model_dir)
    before = module_types(pipe)
    assert optimize_pipeline(pipe, OptimizationConfig(**ALL_OFF)) == []
    assert module_types(pipe) == before
    assert "encode_prompt" not in pipe.__dict__
    assert np.array_equal(images(pipe), eager_images)


@pytest.mark.parametrize("lever", LEVERS + ("prompt_cache_size",))
def test_each_lever_alone_within_tolerance(tiny_model_dir, eager_images, lever):
    pipe = load(tiny_model_dir)
    options = dict(ALL_OFF, **{lever: 8 if lever == "prompt_cache_size" else True})
    applied = optimize_pipeline(pipe, OptimizationConfig(**options))
    assert len(applied) == 1
    first, second = images(pipe), images(pipe)  # the second run hits the prompt cache
    for out in (first, second):
        d = diff(out, eager_images)
        assert d.mean() <= MEAN_TOLERANCE and d.max() <= MAX_TOLERANCE, (lever, d.mean(), d.max())
    if lever in ("fuse_attention", "cross_attention_kv_cache", "prompt_cache_size"):
        assert np.array_equal(first, eager_images)  # same arithmetic, bit for bit
    assert np.array_equal(first, second)


def test_defaults_apply_everything_within_tolerance(tiny_model_dir, eager_images):
    pipe = load(tiny_model_dir)
    applied = optimize_pipeline(pipe, OptimizationConfig())
    assert applied == ["fuse_attention", "cross_attention_kv_cache", "fuse_geglu",
                       "prepack_linear", "channels_last", "prepack_conv", "prompt_cache"]
    assert not any(type(m) is nn.Linear for m in pipe.unet.modules())
    assert not any(type(m) is nn.Conv2d for m in pipe.vae.modules())
    assert any(isinstance(m, PackedLinear) for m in pipe.text_encoder_2.modules())
    assert any(isinstance(m, PackedConv2d) for m in pipe.unet.modules())
    d = diff(images(pipe), eager_images)
    assert d.mean() <= MEAN_TOLERANCE and d.max() <= MAX_TOLERANCE, (d.mean(), d.max())
    # Applying twice does not wrap the prompt cache twice.
    assert "prompt_cache" not in optimize_pipeline(pipe, OptimizationConfig(**dict(
        ALL_OFF, prompt_cache_size=8)))


def test_tiny_vae_is_opt_in_and_loads_from_a_directory(tiny_model_dir, tmp_path):
    from diffusers import AutoencoderTiny

    from serve_app.full_model import save_random_tiny_vae

    assert OptimizationConfig().tiny_vae is None
    path = save_random_tiny_vae(tmp_path / "taesdxl")
    pipe = load(tiny_model_dir)
    applied = optimize_pipeline(pipe, OptimizationConfig(**dict(ALL_OFF, tiny_vae=str(path))))
    assert applied == ["tiny_vae"] and isinstance(pipe.vae, AutoencoderTiny)
    out = images(pipe)  # random decoder weights: only the shape is meaningful
    assert out.shape == (3, 128, 128, 3) and out.dtype == np.uint8


def test_ipex_backend_leaves_weights_to_ipex(tiny_model_dir):
    pipe = load(tiny_model_dir)
    before = module_types(pipe)
    applied = optimize_pipeline(pipe, OptimizationConfig(), backend="ipex")
    assert applied == ["channels_last", "prompt_cache"]
    assert module_types(pipe) == before
