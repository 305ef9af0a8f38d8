"""The official `openai` Python SDK, unchanged, against the running service: images.generate,
images.edit, models.list; its exceptions from our errors; API keys as it sends them."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests.integration.conftest import API_KEYS, API_KEYS_ENV, deployed_app, fake_args


def client(url: str, key: str = "unused") -> openai.OpenAI:
    # max_retries=0: an error must show as the exception, not as retries
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def keyed_app(serve_url, tmp_path_factory):
    with deployed_app(serve_url, "openai-keys", fake_args(
            tmp_path_factory.mktemp("openai-keys"),
            security={"api_keys_env": API_KEYS_ENV})) as url:
        yield url


def test_models_list_names_the_served_model(tiny_app):
    # Issue 23: listed by id (what `model=` takes); the source still names the model.
    models = client(tiny_app).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [
        ("sdxl-turbo", "model", "sdxl-turbo-serve")]
    assert client(tiny_app).models.retrieve("sdxl-turbo").id == "sdxl-turbo"
    assert client(tiny_app).models.retrieve("embedded:tiny-sdxl").id == "sdxl-turbo"
    with pytest.raises(openai.NotFoundError):
        client(tiny_app).models.retrieve("dall-e-3")


def test_generate_with_urls_and_with_b64_json(tiny_app):
    sdk = client(tiny_app)
    result = sdk.images.generate(prompt="a lighthouse", n=2, size="512x512",
                                 quality="hd", style="vivid",  # accepted and ignored
                                 extra_body={"seed": 5, "step": 2})
    assert len(result.data) == 2
    assert all(image.url.startswith(f"{tiny_app}/images/") for image in result.data)
    assert result.created > 0
    inline = sdk.images.generate(prompt="a lighthouse", n=1, response_format="b64_json",
                                 model="sdxl-turbo", extra_body={"seed": 5, "step": 2})
    image = decode(inline.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (512, 512))
    import httpx

    # the same seed, alone in its batch both times: the URL's bytes are the inline ones
    single = sdk.images.generate(prompt="a lighthouse", extra_body={"seed": 5, "step": 2})
    assert httpx.get(single.data[0].url).content == base64.b64decode(inline.data[0].b64_json)


def test_edit_is_image_to_image(tiny_app):
    sdk = client(tiny_app)
    source = png_bytes(600, 400)
    first = sdk.images.edit(image=("in.png", source, "image/png"), prompt="in watercolour",
                            response_format="b64_json", size="auto",
                            extra_body={"seed": 3, "strength": 0.5})
    again = sdk.images.edit(image=("in.png", source, "image/png"), prompt="in watercolour",
                            response_format="b64_json", extra_body={"seed": 3, "strength": 0.5})
    assert decode(first.data[0].b64_json).size == (512, 512)
    assert first.data[0].b64_json == again.data[0].b64_json
    with_url = sdk.images.edit(image=("in.png", source, "image/png"), prompt="x")
    assert with_url.data[0].url.startswith(f"{tiny_app}/images/")


def test_errors_are_the_sdk_exceptions_in_openai_shape(tiny_app):
    sdk = client(tiny_app)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="x", size="256x256")
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "size must be one of ['512x512', '1024x1024'] or auto",
        "type": "invalid_request_error", "param": "size", "code": "invalid_request"}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="x", model="dall-e-3")
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.edit(image=("in.png", png_bytes(1, 1), "image/png"), prompt="x")
    assert (caught.value.body["code"], caught.value.body["param"]) == ("invalid_image", "image")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.edit(image=("in.png", png_bytes(64, 64), "image/png"), prompt="x",
                        mask=("m.png", png_bytes(64, 64), "image/png"))
    assert caught.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="x", stream=False, output_format="webp")
    assert caught.value.body["param"] == "output_format"


def test_api_keys_as_the_sdk_sends_them(keyed_app):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(keyed_app, "wrong-key").images.generate(prompt="x", extra_body={"step": 1})
    assert caught.value.body["code"] == "unauthorized"
    result = client(keyed_app, API_KEYS[0]).images.generate(prompt="x", extra_body={"step": 1})
    assert len(result.data) == 1
    assert [m.id for m in client(keyed_app, API_KEYS[1]).models.list().data] == [
        "sdxl-turbo"]
