"""The OpenAI-compatible mapping and error shape as plain code, without Ray: a fake batcher
handle and an in-memory store (tests/unit/test_services.py's)."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.errors import (
    InvalidImage,
    InvalidRequest,
    NotFound,
    UnknownModel,
    install_error_handlers,
)
from serve_app.generation.schemas import Image2ImageRequest, Text2ImageRequest
from serve_app.ingress.openai_api import (
    OpenAIEditRequest,
    OpenAIImageRequest,
    OpenAIImagesService,
)
from tests.unit.test_services import FakeBatcher, service


def openai_service(batcher: FakeBatcher | None = None, **config) -> OpenAIImagesService:
    generation = service(batcher or FakeBatcher(), **config)
    return OpenAIImagesService(generation, generation.store, generation.config)


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (1, 2, 3)).save(out, "PNG")
    return out.getvalue()


def test_parameters_map_onto_this_services_request():
    api = openai_service()
    native = api.to_request(OpenAIImageRequest(prompt="p", n=3, size="1024x1024", seed=4,
                                               step=2, quality="hd", style="vivid"))
    assert type(native) is Text2ImageRequest
    assert (native.number, native.batch, native.size, native.seed, native.step) == (
        3, 1, "1024x1024", 4, 2)
    # size auto or absent: the first allowed size; defaults from this service
    for size in (None, "auto"):
        native = api.to_request(OpenAIImageRequest(prompt="p", size=size))
        assert (native.size, native.number, native.step) == ("512x512", 1, 4)
    edit = api.to_request(OpenAIEditRequest(prompt="p", image=png(64), strength=0.75))
    assert type(edit) is Image2ImageRequest
    assert (edit.image, edit.strength) == (png(64), 0.75)


@pytest.mark.parametrize("fields, param", [
    ({"size": "256x256"}, "size"),
    ({"model": "dall-e-3"}, "model"),
    ({"stream": True}, "stream"),
    ({"partial_images": 2}, "partial_images"),
    ({"n": 17}, "number"),  # over limits.max_images_per_request
])
def test_rejected_parameters_name_themselves(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        openai_service().to_request(OpenAIImageRequest(prompt="p", **fields))
    assert caught.value.field == param


def test_a_bad_edit_image_is_invalid_image():
    with pytest.raises(InvalidImage):
        openai_service().to_request(OpenAIEditRequest(prompt="p", image=b"not an image"))


def test_models_and_the_served_model_by_alias():
    # Issue 23: models are listed by id (what `model=` takes), no longer by source; the
    # source still names its model, for clients written against the earlier list.
    api = openai_service()
    assert api.models() == {"object": "list", "data": [
        {"id": "sdxl-turbo", "object": "model", "created": 0,
         "owned_by": "sdxl-turbo-serve", "default": True, "source": "embedded", "loras": 0}]}
    assert api.model("sdxl-turbo")["id"] == "sdxl-turbo"
    assert api.model("embedded:tiny-sdxl")["id"] == "sdxl-turbo"
    with pytest.raises(NotFound):
        api.model("gpt-image-1")


def test_several_models_by_id_and_the_sdk_model_parameter():
    api = openai_service(models=[{"id": "tiny-b", "source": "embedded:tiny-sdxl-b"}])
    assert [(m["id"], m["default"]) for m in api.models()["data"]] == [
        ("sdxl-turbo", True), ("tiny-b", False)]
    assert api.model("tiny-b")["id"] == "tiny-b"
    assert api.model("embedded:tiny-sdxl-b")["id"] == "tiny-b"
    assert api.to_request(OpenAIImageRequest(prompt="p", model="tiny-b")).model == "tiny-b"
    assert api.to_request(OpenAIImageRequest(prompt="p")).model == "sdxl-turbo"
    for name in ("dall-e-2", "dall-e-3", "gpt-image-1"):
        with pytest.raises(UnknownModel) as caught:
            api.to_request(OpenAIImageRequest(prompt="p", model=name))
        assert caught.value.message == (
            f"model {name!r} is not served here; valid ids: ['sdxl-turbo', 'tiny-b']")
        assert (caught.value.field, caught.value.status_code) == ("model", 422)  # 400 on /v1
    with pytest.raises(NotFound, match=r"valid ids: \['sdxl-turbo', 'tiny-b'\]"):
        api.model("dall-e-2")


def test_urls_or_inline_pngs():
    api = openai_service()
    request = OpenAIImageRequest(prompt="p", n=2, response_format="b64_json")
    native = api.to_request(request)

    async def run():
        generated = await api.generation.generate(native, "e" * 32, 1, "http://h")
        return generated, await api.respond(request, generated)

    generated, inline = asyncio.run(run())
    assert [base64.b64decode(d["b64_json"]) for d in inline["data"]] == [
        api.store.get("e" * 32, name) for name in ("0_0.png", "1_0.png")]
    as_urls = asyncio.run(api.respond(OpenAIImageRequest(prompt="p"), generated))
    assert as_urls["data"] == [{"url": o["url"]} for o in generated["output"]]


def test_errors_take_openais_shape_under_v1_only():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/thing")
    async def v1_thing():
        raise InvalidRequest("bad size", field="size")

    @app.get("/api/thing")
    async def api_thing():
        raise InvalidRequest("bad size", field="size")

    client = TestClient(app)
    response = client.get("/v1/thing")
    assert (response.status_code, response.json()) == (400, {"error": {
        "message": "bad size", "type": "invalid_request_error", "param": "size",
        "code": "invalid_request"}})
    response = client.get("/api/thing")
    assert (response.status_code, response.json()) == (422, {"status": "error", "error": {
        "code": "invalid_request", "message": "bad size", "field": "size"}})
    response = client.get("/v1/nothing-here")
    assert (response.status_code, response.json()["error"]["type"]) == (
        404, "invalid_request_error")
