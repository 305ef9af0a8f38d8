"""The embedded tiny model is generated once: a start that finds it on disk uses it as it
is (generating it takes torch, diffusers and seconds of CPU at every replica start)."""

from __future__ import annotations

import pytest

from serve_app.model import tiny_model


def _refuse_to_build(*_seed):
    raise AssertionError("the cached tiny model was generated again")


def test_a_cached_tiny_model_is_not_generated_again(tmp_path, monkeypatch):
    target = tmp_path / f"tiny-sdxl-{tiny_model.TINY_MODEL_VERSION}"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    monkeypatch.setattr(tiny_model, "build_tiny_pipeline", _refuse_to_build)
    assert tiny_model.ensure_tiny_model(tmp_path) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_cached_tiny_vae_is_not_generated_again(tmp_path, monkeypatch):
    target = tmp_path / f"tiny-taesd-{tiny_model.TINY_VAE_VERSION}"
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(tiny_model, "build_tiny_vae", _refuse_to_build)
    assert tiny_model.ensure_tiny_vae(tmp_path) == target


def test_a_missing_tiny_model_is_generated_and_a_failed_try_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_model, "build_tiny_pipeline", _refuse_to_build)
    with pytest.raises(AssertionError, match="generated again"):
        tiny_model.ensure_tiny_model(tmp_path)
    # The failed generation leaves no staging directory behind.
    assert list(tmp_path.iterdir()) == []
