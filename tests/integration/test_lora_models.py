"""LoRA adapters behind Ray Serve (issue 23): a model id that names the embedded tiny model
plus an embedded adapter gives another image than the base model for the same prompt and
seed, and switching back to the base gives the base's bytes again; /v1/models counts the
adapters. One model replica holding both (multiplexed)."""

import httpx
import pytest

from tests.integration.conftest import deployed_app, post, ready_within
from tests.integration.test_models import png_of

BODY = {"prompt": "a red boat", "seed": 42, "step": 2, "size": "512x512"}


@pytest.fixture(scope="module")
def lora_app(serve_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-models")
    with deployed_app(serve_url, "loramodels", {
            "model": {"cache_dir": str(tmp / "model")},
            "models": [{"id": "tiny-styled", "source": "embedded:tiny-sdxl",
                        "loras": [{"source": "embedded:tiny-lora-a", "scale": 1.0}]}],
            "replica": {"num_cpus": 1},
            "ingress": {"num_cpus": 0.1},
            "store": {"url": str(tmp / "store")}}) as url:
        yield url



def test_a_lora_model_changes_the_image_and_the_base_comes_back(lora_app):
    base = png_of(post(lora_app, BODY))
    styled_response = post(lora_app, {**BODY, "model": "tiny-styled"})
    assert styled_response.json()["meta"]["input"]["modelId"] == "tiny-styled"
    styled = png_of(styled_response)
    assert styled[:8] == base[:8] == b"\x89PNG\r\n\x1a\n"
    assert styled != base
    # Switching back and forth: each model gives its own bytes again.
    assert png_of(post(lora_app, BODY)) == base
    assert png_of(post(lora_app, {**BODY, "model": "tiny-styled"})) == styled


def test_models_list_their_adapters(lora_app):
    listed = httpx.get(f"{lora_app}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["loras"]) for m in listed] == [("sdxl-turbo", 0), ("tiny-styled", 1)]
    ready = ready_within(lora_app).json()
    assert [m["id"] for m in ready["models"]] == ["sdxl-turbo", "tiny-styled"]
