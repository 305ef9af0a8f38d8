"""LoRA adapters fused into the tiny model (serve_app/model/lora.py), no Ray: an adapter
changes the image, a pipeline without it (or with scale 0) gives the base's bytes again,
the CPU levers still apply after a fused adapter, and the embedded adapters are generated
deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.config import LoraConfig, OptimizationConfig
from serve_app.model import cpu
from serve_app.model.backend import select_backend
from serve_app.model.diffusers_generator import DiffusersGenerator
from serve_app.model.lora import WEIGHT_NAME, apply_loras, ensure_tiny_lora, lora_backend_reason
from serve_app.model.optimize import PackedLinear, optimize_pipeline
from serve_app.protocol import GenerationItem
from tests.optimize.test_pipeline_images import MAX_TOLERANCE, MEAN_TOLERANCE

ITEMS = [GenerationItem("a red cat", 128, 128, steps=2, seed=1)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lora-cache"))


def load(cache_dir, loras=(), levers=False):
    from diffusers import StableDiffusionXLPipeline

    from serve_app.model.tiny_model import ensure_tiny_model

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model(cache_dir),
                                                     dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    applied = apply_loras(pipe, list(loras), cache_dir)
    off = dict(prepack_linear=False, prepack_conv=False, fuse_geglu=False,
               fuse_attention=False, cross_attention_kv_cache=False, channels_last=False,
               prompt_cache_size=0)
    optimize_pipeline(pipe, OptimizationConfig() if levers else OptimizationConfig(**off))
    return pipe, applied


def image(pipe) -> np.ndarray:
    generator = DiffusersGenerator(pipe, device="cpu", dtype=torch.float32, info={})
    return generator.generate(ITEMS)[0][0]


@pytest.fixture(scope="module")
def base_image(cache_dir):
    return image(load(cache_dir)[0])


def test_an_adapter_changes_the_image_and_the_base_comes_back_bit_for_bit(cache_dir,
                                                                          base_image):
    a_pipe, applied = load(cache_dir, [LoraConfig(source="embedded:tiny-lora-a")])
    with_a = image(a_pipe)
    assert applied[0]["adapter_name"] == "lora0" and applied[0]["scale"] == 1.0
    # Fused and unloaded: no peft layer is left to cost time per call.
    assert not any("lora" in name for name, _ in a_pipe.unet.named_modules())
    assert float(np.abs(with_a.astype(int) - base_image.astype(int)).mean()) > 1.0
    with_b = image(load(cache_dir, [LoraConfig(source="embedded:tiny-lora-b")])[0])
    assert float(np.abs(with_b.astype(int) - with_a.astype(int)).mean()) > 1.0
    assert image(load(cache_dir)[0]).tobytes() == base_image.tobytes()


def test_scale_zero_is_the_base_and_the_scale_changes_the_image(cache_dir, base_image):
    zero = image(load(cache_dir, [LoraConfig(source="embedded:tiny-lora-a", scale=0.0)])[0])
    assert zero.tobytes() == base_image.tobytes()
    one = image(load(cache_dir, [LoraConfig(source="embedded:tiny-lora-a")])[0])
    half = image(load(cache_dir, [LoraConfig(source="embedded:tiny-lora-a", scale=0.5)])[0])
    assert half.tobytes() not in (one.tobytes(), base_image.tobytes())


def test_two_adapters_stack(cache_dir):
    a = image(load(cache_dir, [LoraConfig(source="embedded:tiny-lora-a")])[0])
    both = image(load(cache_dir, [LoraConfig(source="embedded:tiny-lora-a"),
                                  LoraConfig(source="embedded:tiny-lora-b",
                                             adapter_name="b")])[0])
    assert both.tobytes() != a.tobytes()


def test_the_levers_apply_to_a_fused_adapter(cache_dir):
    """Fused before the levers: the adapter's layers are plain Linear modules again, so
    prepack_linear packs them, and the image matches the eager one within the levers'
    tolerance (BENCHMARKS.md, "Image tolerance")."""
    loras = [LoraConfig(source="embedded:tiny-lora-a")]
    eager = image(load(cache_dir, loras)[0]).astype(int)
    pipe, _ = load(cache_dir, loras, levers=True)
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    assert isinstance(attn.to_q, PackedLinear)
    fast = image(pipe).astype(int)
    assert float(np.abs(fast - eager).mean()) <= MEAN_TOLERANCE
    assert int(np.abs(fast - eager).max()) <= MAX_TOLERANCE


def test_embedded_adapters_are_generated_the_same_everywhere(tmp_path):
    first = ensure_tiny_lora("embedded:tiny-lora-a", tmp_path / "one")
    second = ensure_tiny_lora("embedded:tiny-lora-a", tmp_path / "two")
    assert (first / WEIGHT_NAME).read_bytes() == (second / WEIGHT_NAME).read_bytes()
    other = ensure_tiny_lora("embedded:tiny-lora-b", tmp_path / "one")
    assert (other / WEIGHT_NAME).read_bytes() != (first / WEIGHT_NAME).read_bytes()


def test_a_file_that_is_no_lora_fails_with_one_line(cache_dir, tmp_path):
    from safetensors.torch import save_file

    from serve_app.model.lora import LoraError

    path = tmp_path / "not-a-lora.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(LoraError) as info:
        load(cache_dir, [LoraConfig(source=str(path))])
    message = str(info.value)
    assert message.startswith(f"LoRA source {str(path)!r}: could not be loaded (ValueError: ")
    assert "\n" not in message


def test_auto_runs_a_model_with_adapters_on_torch(cache_dir):
    """`auto` may pick OpenVINO on this CPU class (backend.OPENVINO_MEASURED_FASTER); with
    adapters it runs torch, and says why, instead of the IR's base-model images."""
    from serve_app.config import AppConfig
    from serve_app.model.pipeline import load_generator

    config = AppConfig.model_validate({"model": {
        "backend": "auto", "cache_dir": cache_dir, "warmup_sizes": [],
        "loras": [{"source": "embedded:tiny-lora-a"}]}, "replica": {"num_cpus": 1}})
    generator = load_generator(config)
    picked = select_backend("auto", torch.__version__, device="cpu",
                            cpu_class=cpu.host().cpu_class)
    if picked.name == "openvino":
        assert generator.info["backend"] == "torch"
        assert generator.info["backend_reason"] == f"auto: {lora_backend_reason('openvino')}"
    else:
        assert generator.info["backend"] == picked.name
    assert [lora["source"] for lora in generator.info["loras"]] == ["embedded:tiny-lora-a"]
    loras = [LoraConfig(source="embedded:tiny-lora-a")]
    eager = image(load(cache_dir, loras)[0]).astype(int)
    served = generator.generate(ITEMS)[0][0].astype(int)
    assert float(np.abs(served - eager).mean()) <= MEAN_TOLERANCE


def test_the_lora_bench_on_the_tiny_model(tiny_model_dir, capsys):
    """`python -m serve_app.bench.models lora` (BENCHMARKS.md, "LoRA adapters"): the
    adapter changes the step's output, fused and unfused agree, an unfuse leaves the base
    close to where it was."""
    import json

    from serve_app.bench.models import main

    main(["lora", "--model", str(tiny_model_dir), "--rank", "4", "--repeat", "1",
          "--threads", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The tiny UNet's 16 attention modules x (to_q, to_k, to_v, to_out.0).
    assert (result["rank"], result["adapter_layers"]) == (4, 64)
    assert result["max_abs_diff_adapter_vs_base"] > 1e-3
    assert result["max_abs_diff_unfused_vs_fused"] < 1e-4
    assert result["max_abs_diff_base_after_unfuse"] < 1e-4
    for key in ("step_base_s", "step_unfused_a_s", "step_fused_a_s", "switch_unfused_s",
                "switch_fused_s", "fuse_s", "unfuse_s", "load_adapter_a_s"):
        assert result[key] > 0
    assert len(result["step_base_all_s"]) == 1
