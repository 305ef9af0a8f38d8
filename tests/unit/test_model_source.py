import pytest

from serve_app.app import build_app
from serve_app.model.source import ModelNotFoundError, looks_like_path, resolve_model_dir


def test_missing_directory_fails_where_the_weights_are_read_with_one_line(tmp_path):
    """Moved from build_app (issue 20): the Serve controller runs on the head, which runs
    the lite image without weights; the model replica resolves the directory when it
    loads the model, and fails there."""
    missing = tmp_path / "sdxl-turbo"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir(str(missing))
    message = str(info.value)
    assert "\n" not in message
    assert str(missing / "model_index.json") in message
    assert "hf download stabilityai/sdxl-turbo" in message


def test_build_app_does_not_need_the_weights(tmp_path):
    """The head (Serve controller) builds the application without the weights directory."""
    missing = tmp_path / "sdxl-turbo"
    app = build_app({"model": {"source": str(missing)}})
    assert app._bound_deployment.name == "Ingress"
    assert not missing.exists()


def test_unreachable_hub_fails_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir("stabilityai/sdxl-turbo")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.source 'stabilityai/sdxl-turbo': not in the local")
    assert "set model.source to it" in message


@pytest.mark.parametrize("source,expected", [
    ("stabilityai/sdxl-turbo", False), ("/models/sdxl-turbo", True), ("./m", True),
    ("~/m", True), ("embedded:tiny-sdxl", False)])
def test_path_or_hub_id(source, expected):
    assert looks_like_path(source) is expected
