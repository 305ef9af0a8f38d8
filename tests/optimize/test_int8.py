"""The torch backend's int8 UNet layers (model.torch_int8, serve_app/model/optimize/int8.py):
each layer against its float original, the whole tiny pipeline against eager at float32,
and the replica's loader choosing them under profile fast by CPU class.

Tolerances (measured here on the tiny model, 2 steps, float32): text-to-image 0.49 mean and
5 max, image-to-image 0.56 mean and 7 max on uint8 RGB, with the levers on or off (bfloat16:
0.58 / 6 and 0.73 / 8); a layer
on a normal input 2% mean relative error. They are looser than the float levers' (0.5 / 8
covers arithmetic reordering only): int8 changes the arithmetic itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from serve_app.config import AppConfig, OptimizationConfig
from serve_app.model import cpu
from serve_app.model.optimize import optimize_pipeline
from serve_app.model.optimize.int8 import (
    Int8Conv2d,
    Int8Linear,
    int8_unusable,
    quantize_int8,
)
from tests.optimize.test_pipeline_images import (
    ALL_OFF,
    diff,
    edit_images,
    images,
    load,
)

INT8_MEAN_TOLERANCE = 1.0
INT8_MAX_TOLERANCE = 12
LAYER_RELATIVE_ERROR = 0.03

pytestmark = pytest.mark.skipif(int8_unusable() is not None,
                                reason=f"int8 layers unusable: {int8_unusable()}")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().mean() / ref.abs().mean())


@pytest.mark.parametrize("activation", ["normal", "silu"])
def test_an_int8_linear_matches_its_float_layer_within_3_percent(activation):
    torch.manual_seed(0)
    linear = nn.Linear(320, 640).eval()
    x = torch.randn(2, 77, 320)
    if activation == "silu":  # asymmetric inputs, as after SiLU and GELU
        x = nn.functional.silu(x)
    with torch.inference_mode():
        ref, out = linear(x), Int8Linear(linear)(x)
    assert (out.shape, out.dtype) == (ref.shape, torch.float32)
    assert relative_error(out, ref) < LAYER_RELATIVE_ERROR


@pytest.mark.parametrize(("kernel", "stride", "activation"),
                         [(3, 1, "normal"), (3, 1, "silu"), (3, 2, "silu"), (1, 1, "normal")])
def test_an_int8_conv_matches_its_float_layer_within_3_percent(kernel, stride, activation):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 96, kernel, stride=stride, padding=kernel // 2).eval()
    x = torch.randn(1, 64, 32, 32)
    if activation == "silu":
        x = nn.functional.silu(x)
    with torch.inference_mode():
        ref, out = conv(x), Int8Conv2d(conv)(x)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < LAYER_RELATIVE_ERROR


def test_a_zero_input_gives_exactly_the_bias():
    """The input's range always includes 0, so zeros (padding, masked values) are exact."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(16, 8).eval(), nn.Conv2d(8, 4, 3, padding=1).eval()
    with torch.inference_mode():
        assert torch.equal(Int8Linear(linear)(torch.zeros(3, 16)), linear.bias.expand(3, 8))
        out = Int8Conv2d(conv)(torch.zeros(1, 8, 5, 5))
    assert torch.allclose(out, conv.bias.view(1, 4, 1, 1).expand(1, 4, 5, 5), atol=1e-6)


def test_quantize_int8_replaces_every_layer_but_the_latent_convolutions(tiny_model_dir):
    pipe = load(tiny_model_dir, torch.float32)
    unet = pipe.unet
    linears = sum(type(m) is nn.Linear for m in unet.modules())
    convs = sum(type(m) is nn.Conv2d for m in unet.modules())
    assert quantize_int8(unet) == linears + convs - 2
    assert not any(type(m) is nn.Linear for m in unet.modules())
    assert [name for name, m in unet.named_modules() if type(m) is nn.Conv2d] == [
        "conv_in", "conv_out"]
    assert sum(isinstance(m, Int8Linear) for m in unet.modules()) == linears
    assert sum(isinstance(m, Int8Conv2d) for m in unet.modules()) == convs - 2
    # The float weights went with the layers: only the latent convolutions and the
    # normalizations keep any.
    norms = {name for name, m in unet.named_modules()
             if isinstance(m, nn.GroupNorm | nn.LayerNorm)}
    owners = {key.rsplit(".", 1)[0] for key in unet.state_dict()}
    assert owners - norms == {"conv_in", "conv_out"}


@pytest.mark.parametrize(("levers", "dtype"), [("off", torch.float32),
                                               ("defaults", torch.float32),
                                               ("off", torch.bfloat16)],
                         ids=["fp32", "fp32-levers", "bf16"])
def test_the_pipeline_with_int8_layers_stays_near_eager(tiny_model_dir, levers, dtype):
    """float32 (what profile fast runs it with on avx2) and bfloat16 (set by hand: the
    layers compute in float32 around the int8 product and hand back bfloat16; measured
    0.58 / 6 and 0.73 / 8)."""
    eager = load(tiny_model_dir, dtype)
    eager_text, eager_edit = images(eager), edit_images(eager)
    pipe = load(tiny_model_dir, dtype)
    options = OptimizationConfig(**ALL_OFF) if levers == "off" else OptimizationConfig()
    report = optimize_pipeline(pipe, options, int8_unet=True)
    assert (report.applied, report.skipped) == ((["int8_unet"], {}) if levers == "off" else (
        ["fuse_attention", "cross_attention_kv_cache", "int8_unet", "prepack_linear",
         "channels_last", "prepack_conv", "prompt_cache"], {}))
    # The attention's fused q/k/v GEMM is an int8 layer too; no float GEMM is left.
    assert not any(type(m) is nn.Linear for m in pipe.unet.modules())
    for got, want in ((images(pipe), eager_text), (edit_images(pipe), eager_edit)):
        d = diff(got, want)
        assert 0 < d.max() <= INT8_MAX_TOLERANCE and d.mean() <= INT8_MEAN_TOLERANCE, (
            d.mean(), d.max())
    again = images(pipe)
    assert np.array_equal(again, images(pipe))  # deterministic call to call


def test_ipex_leaves_the_unet_to_ipex_and_says_so(tiny_model_dir):
    pipe = load(tiny_model_dir, torch.float32)
    report = optimize_pipeline(pipe, OptimizationConfig(**ALL_OFF), backend="ipex",
                               int8_unet=True)
    assert (report.applied, report.skipped) == (
        [], {"int8_unet": "IPEX optimizes the UNet itself"})
    assert not any(isinstance(m, Int8Linear | Int8Conv2d) for m in pipe.unet.modules())


CLASS_FLAGS = {"avx2": {"avx2", "fma"},
               "avx512_bf16": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                               "avx512_bf16"}}


def fast_config(tiny_model_dir, tmp_path, backend: str) -> AppConfig:
    return AppConfig.model_validate({
        "model": {"source": str(tiny_model_dir), "warmup_sizes": [], "backend": backend,
                  "profile": "fast", "dtype": "float32", "cache_dir": str(tmp_path),
                  "tiny_vae_source": "embedded:tiny-taesd"},
        "replica": {"num_cpus": 1}})


@pytest.mark.parametrize("cpu_class", ["avx2", "avx512_bf16"])
def test_the_loader_runs_int8_layers_under_profile_fast_where_measured(
        tiny_model_dir, tmp_path, monkeypatch, cpu_class):
    """backend torch with profile fast, as a replica loads it, on a CPU detected as
    `cpu_class` (the flags are stubbed; the kernels are the same on every x86 CPU, since
    7-bit inputs make the int8 sums exact everywhere): int8 layers on avx2 (measured
    faster), the dtype elsewhere, with the reason in the replica's info either way."""
    from serve_app.model.pipeline import load_generator

    host = cpu.CpuCapabilities(frozenset(CLASS_FLAGS[cpu_class]))
    assert host.cpu_class == cpu_class
    monkeypatch.setattr(cpu, "host", lambda: host)
    config = fast_config(tiny_model_dir, tmp_path, "torch")
    int8, reason = config.model.resolve_torch_int8(cpu_class)
    assert int8 == (cpu_class == "avx2")
    info = load_generator(config).info
    assert info["torch_int8_reason"] == reason
    assert info["parts"]["unet"] == ("int8" if int8 else "float32")
    assert ("int8_unet" in info["optimizations"]) == int8
    assert info["optimizations_skipped"].get("int8_unet") == (None if int8 else reason)


def test_backend_auto_with_profile_fast_runs_torch_int8_on_avx2(tiny_model_dir, tmp_path,
                                                                monkeypatch):
    from serve_app.config import FAST_TORCH_INT8_MEASURED
    from serve_app.model.pipeline import load_generator

    host = cpu.CpuCapabilities(frozenset(CLASS_FLAGS["avx2"]))
    monkeypatch.setattr(cpu, "host", lambda: host)
    info = load_generator(fast_config(tiny_model_dir, tmp_path, "auto")).info
    assert (info["backend"], info["backend_reason"]) == (
        "torch", "auto, profile fast: torch with int8 UNet layers measured fastest on avx2 "
                 f"CPUs ({FAST_TORCH_INT8_MEASURED['avx2']})")
    assert info["parts"] == {"unet": "int8", "vae": "tiny (embedded:tiny-taesd)"}
    assert "int8_unet" in info["optimizations"]


def int8_config(tiny_model_dir, tmp_path, **model) -> AppConfig:
    return AppConfig.model_validate({
        "model": {"source": str(tiny_model_dir), "warmup_sizes": [], "backend": "torch",
                  "torch_int8": "dynamic", "dtype": "float32", **model},
        "replica": {"num_cpus": 1}})


def generated(generator) -> np.ndarray:
    from tests.optimize.test_pipeline_images import ITEMS

    return np.stack([img for group in generator.generate(ITEMS) for img in group])


def test_the_int8_cache_is_written_once_and_read_at_the_next_start(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    """The first start converts and writes the entry; the next reads it without loading the
    UNet's float weights (diffusers' UNet loader is made to fail) and gives the same bytes."""
    from diffusers import UNet2DConditionModel

    from serve_app.model.optimize.int8_cache import MARKER, TENSORS
    from serve_app.model.pipeline import load_generator

    config = int8_config(tiny_model_dir, tmp_path, torch_int8_cache_dir=str(tmp_path / "c"))
    first = load_generator(config)
    cache = first.info["torch_int8_cache"]
    entry = tmp_path / "c" / Path(cache["entry"]).name
    assert (cache["hit"], Path(cache["entry"]).parent) == (False, tmp_path / "c")
    assert entry.name.startswith("float32-")
    assert sorted(p.name for p in entry.iterdir()) == sorted([MARKER, TENSORS])
    assert first.info["optimizations"][-2:] == ["prompt_cache", "int8_cache"]
    assert "int8_unet" in first.info["optimizations"]

    def no_float_unet(*args, **kwargs):
        raise AssertionError("the UNet's float weights were loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_float_unet)
    second = load_generator(config)
    assert second.info["torch_int8_cache"] == {"entry": str(entry), "hit": True}
    assert second.info["optimizations"] == first.info["optimizations"]
    assert second.info["parts"]["unet"] == "int8"
    assert [p.name for p in (tmp_path / "c").iterdir()] == [entry.name]  # nothing rewritten
    assert np.array_equal(generated(second), generated(first))


def test_the_int8_cache_key_follows_the_attention_fusion_and_the_dtype(tiny_model_dir,
                                                                      tmp_path):
    from serve_app.model.optimize.int8_cache import entry_for

    root = tmp_path / "c"
    fused = entry_for(root, tiny_model_dir, dtype="float32", fuse_attention=True)
    assert fused == entry_for(root, tiny_model_dir, dtype="float32", fuse_attention=True)
    assert len({fused, entry_for(root, tiny_model_dir, dtype="float32", fuse_attention=False),
                entry_for(root, tiny_model_dir, dtype="bfloat16", fuse_attention=True)}) == 3
    unfused = load_generator_info(int8_config(
        tiny_model_dir, tmp_path, torch_int8_cache_dir=str(root),
        optimization={"fuse_attention": False}))
    assert unfused["torch_int8_cache"]["entry"] == str(
        entry_for(root, tiny_model_dir, dtype="float32", fuse_attention=False))


def load_generator_info(config: AppConfig) -> dict:
    from serve_app.model.pipeline import load_generator

    return load_generator(config).info


def test_an_unwritable_int8_cache_is_skipped_with_the_reason(tiny_model_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    info = load_generator_info(int8_config(
        tiny_model_dir, tmp_path, torch_int8_cache_dir=str(tmp_path / "a-file" / "cache")))
    assert "int8_unet" in info["optimizations"] and "int8_cache" not in info["optimizations"]
    assert info["optimizations_skipped"]["int8_cache"] == (
        f"{tmp_path / 'a-file' / 'cache'} is not writable (Not a directory)")
    assert info["torch_int8_cache"]["hit"] is False


def test_a_torn_int8_cache_entry_is_converted_again(tiny_model_dir, tmp_path, caplog):
    from serve_app.model.optimize.int8_cache import TENSORS

    config = int8_config(tiny_model_dir, tmp_path, torch_int8_cache_dir=str(tmp_path / "c"))
    entry = Path(load_generator_info(config)["torch_int8_cache"]["entry"])
    (entry / TENSORS).write_bytes((entry / TENSORS).read_bytes()[:1000])
    with caplog.at_level("WARNING", logger="serve_app.model.optimize.int8_cache"):
        info = load_generator_info(config)
    assert f"int8 cache entry {entry} unusable" in caplog.text
    assert info["torch_int8_cache"]["hit"] is False
    assert "int8_unet" in info["optimizations"]


def test_the_int8_cache_turned_off_or_without_int8(tiny_model_dir, tmp_path):
    off = load_generator_info(int8_config(tiny_model_dir, tmp_path, torch_int8_cache_dir=""))
    assert off["torch_int8_cache"] is None and "int8_cache" not in off["optimizations"]
    assert "int8_unet" in off["optimizations"]
    plain = load_generator_info(int8_config(tiny_model_dir, tmp_path, torch_int8="off",
                                            torch_int8_cache_dir=str(tmp_path / "c")))
    assert plain["torch_int8_cache"] is None and not (tmp_path / "c").exists()
