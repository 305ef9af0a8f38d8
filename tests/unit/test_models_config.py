"""Several models in one config (issue 23): `model:` is the default, `models:` the others,
each resolved to a full ModelConfig; ids unique; errors name the offending model."""

import pytest
from pydantic import ValidationError

from serve_app.config import (
    DEFAULT_MODEL_ID,
    AppConfig,
    LoraConfig,
    ModelConfig,
    ModelEntry,
)

TWO = {
    "model": {"source": "embedded:tiny-sdxl", "dtype": "float32", "profile": "fast",
              "warmup_sizes": ["512x512"], "cache_dir": "/cache",
              "optimization": {"prompt_cache_size": 8}},
    "models": [{"id": "tiny-b", "source": "embedded:tiny-sdxl-b"},
               {"id": "other", "source": "/models/other", "dtype": "bfloat16",
                "backend": "torch", "openvino": {"weights": "int8"},
                "loras": [{"source": "/loras/a.safetensors", "scale": 0.5,
                           "adapter_name": "style"}],
                "memory_gib": 5}],
}


def test_the_default_model_alone_is_sdxl_turbo():
    config = AppConfig()
    assert config.model.id == DEFAULT_MODEL_ID == "sdxl-turbo"
    assert config.model.loras == [] and config.models == []
    assert list(config.resolved_models()) == ["sdxl-turbo"]
    assert config.resolved_models()["sdxl-turbo"] is config.model
    assert config.default_model_id == "sdxl-turbo"
    assert config.max_models_per_replica == 1


def test_entries_inherit_the_default_models_settings_unless_they_override_them():
    config = AppConfig.model_validate(TWO)
    models = config.resolved_models()
    assert list(models) == ["sdxl-turbo", "tiny-b", "other"]
    b, other = models["tiny-b"], models["other"]
    assert all(isinstance(m, ModelConfig) for m in models.values())
    assert (b.id, b.source, b.dtype, b.profile, b.backend) == (
        "tiny-b", "embedded:tiny-sdxl-b", "float32", "fast", "auto")
    # Not overridable per model: taken from `model:`.
    assert (b.cache_dir, b.warmup_sizes, b.optimization.prompt_cache_size) == (
        "/cache", ["512x512"], 8)
    assert b.loras == [] and b.memory_gib is None
    # backend torch: a model with loras does not run on openvino (tests/unit/test_lora.py).
    assert (other.dtype, other.backend, other.openvino.weights, other.memory_gib) == (
        "bfloat16", "torch", "int8", 5)
    assert other.loras == [LoraConfig(source="/loras/a.safetensors", scale=0.5,
                                      adapter_name="style")]
    # The embedded second model has the embedded tiny VAE, a directory model taesdxl.
    assert b.resolved_tiny_vae_source == "embedded:tiny-taesd"
    assert other.resolved_tiny_vae_source == "madebyollin/taesdxl"
    assert (b.source_kind, other.source_kind, config.model.source_kind) == (
        "embedded", "directory", "embedded")
    # Every configured model fits a replica by default (up to the cap of 3).
    assert config.max_models_per_replica == 3
    # What a generator factory gets: the same config with `model` being that model.
    for_b = config.for_model("tiny-b")
    assert for_b.model == b and for_b.models == []
    assert for_b.store == config.store and config.model.id == "sdxl-turbo"


def test_max_models_per_replica_default_is_capped_and_can_be_set():
    many = AppConfig.model_validate({"models": [
        {"id": f"m{i}", "source": "embedded:tiny-sdxl-b"} for i in range(5)]})
    assert many.max_models_per_replica == 3
    two = AppConfig.model_validate({"models": [{"id": "b", "source": "embedded:tiny-sdxl-b"}]})
    assert two.max_models_per_replica == 2
    set_ = AppConfig.model_validate({"replica": {"max_models_per_replica": 1,
                                                 "models_memory_gib": 30}})
    assert (set_.max_models_per_replica, set_.replica.models_memory_gib) == (1, 30)


def test_memory_estimates_by_source_and_dtype():
    models = AppConfig.model_validate(TWO).resolved_models()
    assert models["tiny-b"].estimated_memory_gib("float32") == 0.1
    assert models["other"].estimated_memory_gib("bfloat16") == 5  # as configured
    sdxl = ModelConfig(source="/models/sdxl-turbo")
    assert sdxl.estimated_memory_gib("bfloat16") == 7.0
    assert sdxl.estimated_memory_gib("float32") == 14.0
    int8 = ModelConfig(source="/models/sdxl-turbo", backend="openvino",
                       openvino={"weights": "int8"})
    assert int8.estimated_memory_gib("float32") == 4.0
    # profile fast picks the weights by the replica's CPU: unloaded, sized for the larger
    # (the dtype's); once loaded, by the weights the replica reports.
    fast = ModelConfig(source="/models/sdxl-turbo", backend="openvino", profile="fast")
    assert fast.estimated_memory_gib("float32") == 14.0
    assert fast.estimated_memory_gib("bfloat16", unet="int8") == 4.0
    assert fast.estimated_memory_gib("float32", unet="float32") == 14.0
    # torch runs the dtype's weights whatever is configured.
    assert ModelConfig(source="/models/sdxl-turbo", backend="torch",
                       openvino={"weights": "int8"}).estimated_memory_gib(
        "bfloat16", unet="bfloat16") == 7.0


def test_duplicate_ids_are_refused_naming_the_id():
    with pytest.raises(ValidationError, match="model id 'b' is used twice"):
        AppConfig.model_validate({"models": [{"id": "b", "source": "x/y"},
                                             {"id": "b", "source": "x/z"}]})
    with pytest.raises(ValidationError, match="model id 'sdxl-turbo' is used twice"):
        AppConfig.model_validate({"models": [{"id": "sdxl-turbo", "source": "x/y"}]})


@pytest.mark.parametrize("entry,message", [
    ({"id": "b", "source": "x/y", "steps": 4}, r"models\[0\] \(id 'b'\): steps: Extra inputs"),
    ({"id": "b", "source": "x/y", "optimization": {}},
     r"models\[0\] \(id 'b'\): optimization: Extra inputs"),
    ({"id": "b", "source": "x/y", "dtype": "int4"}, r"models\[0\] \(id 'b'\): dtype: Input"),
    ({"id": "b/../c", "source": "x/y"}, r"models\[0\] \(id 'b/../c'\): id: String should"),
    ({"source": "x/y"}, r"models\[0\] \(id None\): id: Field required"),
    ({"id": "b", "source": "x/y", "loras": [{"source": "a", "scale": 9}]},
     r"models\[0\] \(id 'b'\): loras.0.scale: Input should be less"),
    ({"id": "b", "source": "x/y", "loras": [{"source": "a", "adapter_name": "s"},
                                           {"source": "c", "adapter_name": "s"}]},
     r"models\[0\] \(id 'b'\): loras: Value error, loras: adapter_name used twice"),
])
def test_invalid_entries_name_the_model(entry, message):
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate({"models": [entry]})


def test_per_model_checks_name_the_model():
    with pytest.raises(ValidationError, match=r"models\[id 'gpu'\].dtype float16 needs a GPU"):
        AppConfig.model_validate({"models": [{"id": "gpu", "source": "x/y",
                                              "dtype": "float16"}]})
    with pytest.raises(ValidationError, match="model 'big': memory_gib 40.0 is over"):
        AppConfig.model_validate({"replica": {"models_memory_gib": 30},
                                  "models": [{"id": "big", "source": "x/y",
                                              "memory_gib": 40}]})
    with pytest.raises(ValidationError) as caught:
        AppConfig.model_validate({"model": {"id": "has space"}})
    assert caught.value.errors()[0]["loc"] == ("model", "id")


def test_lora_fields_are_checked():
    assert LoraConfig(source="embedded:test-lora").scale == 1.0
    with pytest.raises(ValidationError):
        LoraConfig(source="a", adapter_name="a.b")
    with pytest.raises(ValidationError):
        LoraConfig(source="")
    with pytest.raises(ValidationError):
        LoraConfig(source="a", unknown=1)
    with pytest.raises(ValidationError):
        ModelEntry(id="b", source="a", loras=[{"source": "a", "scale": -4.5}])


def test_only_the_embedded_models_that_exist_are_accepted():
    with pytest.raises(ValidationError, match=r"the embedded models are \['embedded:tiny-sdxl'"):
        AppConfig.model_validate({"model": {"source": "embedded:tiny-sdxl-c"}})
    with pytest.raises(ValidationError, match=r"models\[0\] \(id 'c'\): source: Value error"):
        AppConfig.model_validate({"models": [{"id": "c", "source": "embedded:nope"}]})
