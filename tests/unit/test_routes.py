"""The HTTP app as the ingress builds it (serve_app/ingress/deployment.py build_http_app),
in-process with fake services: every route in its protocol's module, the request bodies
documented as before, and one read_request for every body (limits, formats, the job's
choice between text- and image-to-image)."""

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient

from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.generation.schemas import Text2ImageRequest
from serve_app.ingress.deployment import build_http_app
from serve_app.ingress.openai_api import OpenAIEditRequest
from serve_app.ingress.parsing import MAX_BODY_BYTES, read_request
from serve_app.ingress.services import IngressServices
from serve_app.jobs.records import Image2ImageJobRequest, JobRequest
from tests.unit.test_input_images import png
from tests.unit.test_request_parsing import http_request

CONFIG = AppConfig()


def spec() -> dict:
    services = IngressServices(config=CONFIG, api_keys=None, store=None, generation=None,
                               jobs=None, openai=None, readiness=None)  # type: ignore[arg-type]
    return TestClient(build_http_app(services)).get("/openapi.json").json()


def test_every_route_of_every_protocol_is_served():
    assert {(path, method) for path, item in spec()["paths"].items() for method in item} == {
        ("/healthz", "get"), ("/readyz", "get"), ("/api/text2image", "post"),
        ("/api/image2image", "post"), ("/images/{image_id}/{name}", "get"),
        ("/api/text2image/stream", "post"), ("/api/image2image/stream", "post"),
        ("/api/jobs/{job_id}/events", "get"), ("/api/jobs", "post"),
        ("/api/jobs/{job_id}", "get"), ("/v1/models", "get"),
        ("/v1/models/{model_id}", "get"), ("/v1/images/generations", "post"),
        ("/v1/images/edits", "post")}


def test_the_request_bodies_are_documented_in_the_formats_they_are_read_in():
    paths = spec()["paths"]

    def formats(path: str) -> dict:
        """content type -> the schema's title (or the titles it may be), multipart's image."""
        out = {}
        for kind, media in paths[path]["post"]["requestBody"]["content"].items():
            schema = media["schema"]
            titles = [s["title"] for s in schema.get("anyOf", [schema])]
            image = schema.get("properties", {}).get("image", {}).get("format")
            out[kind] = (titles, image)
        return out

    for path in ("/api/text2image", "/api/text2image/stream"):
        assert formats(path) == {"application/json": (["Text2ImageRequest"], None)}
    for path in ("/api/image2image", "/api/image2image/stream"):
        assert formats(path) == {
            "application/json": (["Image2ImageRequest"], "base64"),
            "multipart/form-data": (["Image2ImageRequest"], "binary")}
    assert formats("/api/jobs") == {
        "application/json": (["JobRequest", "Image2ImageJobRequest"], None)}
    assert formats("/v1/images/generations") == {
        "application/json": (["OpenAIImageRequest"], None)}
    assert formats("/v1/images/edits") == {
        "multipart/form-data": (["OpenAIEditRequest"], "binary")}


def read(raw: bytes, model, content_type: str | None = None):
    return asyncio.run(read_request(http_request(raw, content_type), model, CONFIG))


JOB = (JobRequest, Image2ImageJobRequest)


def test_a_job_is_text_or_image_to_image_by_its_image_field():
    text = read(json.dumps({"prompt": "p"}).encode(), JOB)
    assert type(text) is JobRequest
    image = png(128, 128)
    job = read(json.dumps({"prompt": "p", "image": base64.b64encode(image).decode()}).encode(),
               JOB)
    assert type(job) is Image2ImageJobRequest and job.image == image


def test_a_body_without_an_image_is_held_to_64_kib_even_where_one_may_come():
    padded = json.dumps({"prompt": "p", "pad": "x" * MAX_BODY_BYTES}).encode()
    with pytest.raises(PayloadTooLarge) as info:
        read(padded, JOB)
    assert (info.value.status_code, info.value.field) == (413, "body")
    with pytest.raises(PayloadTooLarge):
        read(padded, Text2ImageRequest)


def test_a_job_body_is_json_whatever_its_content_type():
    with pytest.raises(InvalidRequest) as info:
        read(b"--x\r\n", JOB, "multipart/form-data; boundary=x")
    assert info.value.field == "body"
    assert str(info.value).startswith("body is not valid JSON")


def test_openai_edits_take_multipart_only_and_the_image_as_a_file():
    with pytest.raises(InvalidRequest) as info:
        read(json.dumps({"prompt": "p"}).encode(), OpenAIEditRequest, "application/json")
    assert (info.value.field, str(info.value)) == (
        "body", "send multipart/form-data with the image as a file part")
    image = png(64, 64)
    form = (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b--\r\n")
    edit = read(form, OpenAIEditRequest, "multipart/form-data; boundary=b")
    assert (edit.prompt, edit.image) == ("a cat", image)


def test_a_route_reaches_the_replicas_services_and_answers_as_before():
    """In-process, no Ray: the native text-to-image route over a GenerationService with a
    fake batcher (the request id and the seed are the service's own defaults)."""
    from serve_app.ingress.auth import ApiKeys
    from tests.unit.test_services import FakeBatcher, service

    batcher = FakeBatcher()
    generation = service(batcher)
    services = IngressServices(config=generation.config, api_keys=ApiKeys(["k"]),
                               store=generation.store, generation=generation, jobs=None,
                               openai=None, readiness=None)  # type: ignore[arg-type]
    client = TestClient(build_http_app(services))
    refused = client.post("/api/text2image", json={"prompt": "p"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
    answer = client.post("/api/text2image", json={"prompt": "p", "seed": 7, "number": 2},
                         headers={"Authorization": "Bearer k"})
    assert answer.status_code == 200
    body = answer.json()
    assert (body["meta"]["input"]["seed"], len(body["output"]), len(body["id"])) == (7, 2, 32)
    assert [c.seed for c in batcher.calls] == [7, 7]
    assert answer.headers["Server-Timing"].startswith("pipeline;dur=")
    assert body["output"][0]["url"] == f"http://testserver/images/{body['id']}/0_0.png"
    image = client.get(body["output"][0]["url"].removeprefix("http://testserver"),
                       headers={"Authorization": "Bearer k"})
    assert (image.status_code, image.content[:8]) == (200, b"\x89PNG\r\n\x1a\n")
    unseeded = client.post("/api/text2image", json={"prompt": "p"},
                           headers={"Authorization": "Bearer k"}).json()
    assert unseeded["meta"]["input"]["seed"] == batcher.calls[-1].seed
