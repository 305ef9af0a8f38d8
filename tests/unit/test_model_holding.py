"""What a model replica holds (serve_app/model/models.py), without Ray: the generator a
model id loads, the eviction report Ray's multiplexer triggers through __del__, and the
memory account that decides evictions for replica.models_memory_gib."""

import gc
from types import SimpleNamespace

import pytest

from serve_app.config import AppConfig, LoraConfig
from serve_app.model.models import (
    HeldModels,
    LoadedModel,
    ModelLoadError,
    load_model_generator,
)

FAKE = {"source": "fake", "generator": "serve_app.testing:load_fake_generator",
        "warmup_sizes": [], "generator_options": {"delay_s": 0.0}}


def test_each_model_loads_with_its_own_model_config():
    config = AppConfig.model_validate({"model": FAKE, "models": [
        {"id": "b", "source": "fake-b", "profile": "fast"}]})
    default = load_model_generator(config, "sdxl-turbo")
    other = load_model_generator(config, "b")
    # The fake generator reports the profile of the model config it was given.
    assert (default.info["profile"], other.info["profile"]) == ("quality", "fast")
    with pytest.raises(ModelLoadError, match=r"model 'c' is not configured here"):
        load_model_generator(config, "c")


def record_loras(config):
    """A generator factory that reports the adapters of the model it was given."""
    return SimpleNamespace(info={"loras": config.model.loras})


def test_a_model_with_lora_adapters_is_given_its_adapters():
    """(Was refused until serve_app/model/lora.py applied them: tests/optimize/test_lora.py,
    tests/integration/test_lora_models.py.)"""
    config = AppConfig.model_validate({"model": {
        **FAKE, "generator": "tests.unit.test_model_holding:record_loras"}, "models": [
        {"id": "styled", "source": "fake", "loras": [{"source": "embedded:test-lora",
                                                      "scale": 0.5}]}]})
    assert load_model_generator(config, "styled").info["loras"] == [
        LoraConfig(source="embedded:test-lora", scale=0.5)]
    assert load_model_generator(config, "sdxl-turbo").info["loras"] == []


def test_an_evicted_model_reports_once_and_drops_its_generator():
    evicted: list[str] = []
    loaded = LoadedModel("b", object(), evicted.append)  # type: ignore[arg-type]
    loaded.__del__()  # what Ray's multiplexer calls when it evicts the model
    assert (evicted, loaded.generator) == (["b"], None)
    loaded.__del__()
    del loaded
    gc.collect()  # and the collector's own call later: nothing more
    assert evicted == ["b"]


def test_the_memory_account_decides_what_fits():
    held = HeldModels(budget_gib=16.0)
    held.add("a", 7.0)
    assert held.fits(7.0) and not held.fits(9.5)
    held.add("b", 7.0)
    assert not held.fits(7.0)
    assert held.remove("a") and not held.remove("a")
    assert held.fits(7.0)
    assert held.snapshot() == {"held": ["b"], "held_gib": 7.0, "budget_gib": 16.0}
    unbounded = HeldModels()
    unbounded.add("a", 100.0)
    assert unbounded.fits(1000.0) and len(unbounded) == 1
