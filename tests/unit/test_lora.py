"""LoRA adapters in the config and their sources (serve_app/model/lora.py), without loading
a pipeline: the OpenVINO backend refuses adapters with a line naming it, `auto` runs them on
torch, and sources resolve to what diffusers' load_lora_weights takes, or fail with one
line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, LoraConfig
from serve_app.model.lora import LoraError, adapter_names, lora_backend_reason, resolve_lora


def test_openvino_with_adapters_is_refused_in_the_config_naming_the_backend():
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate({"model": {"backend": "openvino", "loras": [
            {"source": "embedded:tiny-lora-a"}]}})
    message = str(info.value)
    assert "model.loras: LoRA adapters run on the torch backends" in message
    assert "set backend: auto or torch" in message
    # The config's wording (config.py cannot import the torch-side module) is the loader's.
    assert lora_backend_reason("openvino") in message


def test_a_models_entry_on_openvino_with_adapters_is_refused_naming_its_id():
    """Also when the entry inherits backend openvino from `model:`."""
    for entry, model in (({"backend": "openvino"}, {}), ({}, {"backend": "openvino"})):
        with pytest.raises(ValidationError) as info:
            AppConfig.model_validate({"model": model, "models": [
                {"id": "styled", "source": "embedded:tiny-sdxl",
                 "loras": [{"source": "embedded:tiny-lora-a"}], **entry}]})
        assert "models[id 'styled'].loras: LoRA adapters run on the torch backends" in str(
            info.value)


@pytest.mark.parametrize("backend", ["auto", "torch", "ipex"])
def test_adapters_are_accepted_on_the_torch_backends(backend):
    config = AppConfig.model_validate({"model": {"backend": backend, "loras": [
        {"source": "embedded:tiny-lora-a", "scale": 0.5}]}})
    assert config.model.loras == [LoraConfig(source="embedded:tiny-lora-a", scale=0.5)]


def test_a_lora_entry_takes_only_its_fields():
    with pytest.raises(ValidationError) as info:
        LoraConfig.model_validate({"source": "x/y", "weight": 1.0})
    assert "weight" in str(info.value) and "Extra inputs are not permitted" in str(info.value)
    lora = LoraConfig(source="x/y")
    assert (lora.weight_name, lora.scale, lora.adapter_name) == (None, 1.0, None)


def test_adapter_names_default_by_position():
    loras = [LoraConfig(source="a/b"), LoraConfig(source="c/d", adapter_name="style")]
    assert adapter_names(loras) == ["lora0", "style"]


def test_a_safetensors_file_resolves_to_its_directory_and_name(tmp_path):
    path = tmp_path / "my-style.safetensors"
    path.write_bytes(b"")
    assert resolve_lora(LoraConfig(source=str(path))) == (str(tmp_path), "my-style.safetensors")


def test_a_directory_keeps_the_configured_weight_name(tmp_path):
    lora = LoraConfig(source=str(tmp_path), weight_name="w.safetensors")
    assert resolve_lora(lora) == (str(tmp_path), "w.safetensors")


def test_a_hub_id_is_passed_on_with_its_weight_name():
    lora = LoraConfig(source="latent-consistency/lcm-lora-sdxl", weight_name="x.safetensors")
    assert resolve_lora(lora) == ("latent-consistency/lcm-lora-sdxl", "x.safetensors")


def test_a_missing_path_fails_with_one_line(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LoraError) as info:
        resolve_lora(LoraConfig(source=str(missing)))
    assert str(info.value) == f"LoRA source {str(missing)!r}: no such file or directory"


def test_an_unknown_embedded_adapter_names_the_ones_there_are():
    with pytest.raises(LoraError) as info:
        resolve_lora(LoraConfig(source="embedded:tiny-lora-z"))
    assert str(info.value) == ("LoRA source 'embedded:tiny-lora-z': no such embedded adapter "
                               "(there are embedded:tiny-lora-a, embedded:tiny-lora-b)")


def test_the_openvino_loader_refuses_adapters_before_loading_anything():
    from serve_app.model.openvino.runtime import load_openvino_generator

    config = AppConfig.model_validate({"model": {"backend": "auto", "source": "/nonexistent",
                                                 "loras": [{"source": "a/b"}]}})
    with pytest.raises(LoraError) as info:
        load_openvino_generator(config)
    assert str(info.value) == lora_backend_reason("openvino")
