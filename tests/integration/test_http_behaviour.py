"""HTTP behaviour through real Ray Serve, with a fake generator behind the model replica."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_app.generation.schemas import ERROR_DESCRIPTIONS, ErrorResponse
from serve_app.testing import FAIL_PROMPT
from tests.integration.conftest import fake_args, post


def test_urls_follow_the_route_prefix_and_host(fake_app):
    body = post(fake_app, {"prompt": "p", "number": 2}).json()
    assert body["output"][0]["url"] == f"{fake_app}/images/{body['id']}/0_0.png"
    assert body["gridUrl"] == f"{fake_app}/images/{body['id']}/image_grid.png"
    localhost = fake_app.replace("127.0.0.1", "localhost")
    other = post(localhost, {"prompt": "p"}).json()
    assert other["output"][0]["url"].startswith(f"{localhost}/images/")


def test_json_content_type_is_accepted_too(fake_app):
    response = httpx.post(f"{fake_app}/api/text2image", json={"prompt": "p", "batch": 3})
    assert response.status_code == 200
    assert len(response.json()["output"]) == 3


@pytest.mark.parametrize("body,field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "p", "size": "123x456"}, "size"),
    ({"prompt": "p", "step": 0}, "step"),
    ({"prompt": "p", "number": "two"}, "number"),
    ({"prompt": "p", "colour": "red"}, "colour"),
])
def test_bad_input_gets_422_naming_the_field(fake_app, body, field):
    response = post(fake_app, body)
    assert response.status_code == 422
    assert response.json()["status"] == "error"
    assert response.json()["error"]["field"] == field
    assert response.json()["error"]["code"] == "invalid_request"


def test_malformed_bodies(fake_app):
    not_json = httpx.post(f"{fake_app}/api/text2image", content=b"prompt=cat")
    assert not_json.status_code == 422
    assert not_json.json()["error"]["field"] == "body"
    too_big = httpx.post(f"{fake_app}/api/text2image", content=b"x" * (65 * 1024))
    assert too_big.status_code == 413
    # The service keeps serving afterwards.
    assert post(fake_app, {"prompt": "still here"}).status_code == 200


@pytest.mark.parametrize("path", [
    "/images/{id}/5_5.png",
    "/images/00000000000000000000000000000000/0_0.png",
    "/images/{id}/../../../etc/passwd",
    "/images/{id}/..%2F..%2Fetc%2Fpasswd",
    "/images/..%2F..%2F..%2Fetc/passwd",
    "/images/%2Fetc%2Fpasswd/0_0.png",
    "/images/{id}/%2Fetc%2Fpasswd",
    "/images/{id}/0_0.txt",
    "/images/{id}",
])
def test_unknown_images_and_traversal_get_404(fake_app, path):
    image_id = post(fake_app, {"prompt": "p"}).json()["id"]
    response = httpx.get(fake_app + path.format(id=image_id))
    assert response.status_code == 404
    assert "root:" not in response.text


def test_unknown_routes_and_methods_get_the_json_error_body(fake_app):
    missing = httpx.get(f"{fake_app}/api/no-such-endpoint")
    assert missing.status_code == 404
    assert missing.json() == {"status": "error", "error": {
        "code": "not_found", "message": "no endpoint at /fake/api/no-such-endpoint"}}
    wrong = httpx.get(f"{fake_app}/api/text2image")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.json()["error"]["message"] == "GET is not allowed on /fake/api/text2image"


def test_failed_generation_gets_500_with_request_id_and_no_trace(fake_app):
    response = post(fake_app, {"prompt": FAIL_PROMPT})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "generation_failed"
    assert error["message"] == "image generation failed"
    assert uuid.UUID(hex=error["requestId"]).version == 4
    assert "Traceback" not in response.text and "internal detail" not in response.text
    assert post(fake_app, {"prompt": "after a failure"}).status_code == 200


def test_openapi_documents_the_request_body(fake_app):
    spec = httpx.get(f"{fake_app}/openapi.json").json()
    operation = spec["paths"]["/api/text2image"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["prompt"]
    assert set(schema["properties"]) == {"prompt", "number", "size", "step", "batch", "seed",
                                          "model"}


def test_openapi_documents_the_error_body(fake_app):
    """The 422 of /api/text2image is documented with the body errors really have."""
    spec = httpx.get(f"{fake_app}/openapi.json").json()
    responses = spec["paths"]["/api/text2image"]["post"]["responses"]
    assert responses["422"] == {
        "description": ERROR_DESCRIPTIONS[422],
        "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorDetail"}
    assert schemas["ErrorDetail"]["required"] == ["code", "message"]
    assert set(schemas["ErrorDetail"]["properties"]) == {"code", "message", "field",
                                                         "requestId"}
    # The documented body is what a 422 carries.
    body = post(fake_app, {"prompt": "p", "step": 0}).json()
    assert ErrorResponse.model_validate(body).model_dump(exclude_none=True) == body


def test_full_queue_gets_503_with_retry_after(deployed, tmp_path):
    url = deployed("slow", fake_args(
        tmp_path,
        model={"generator_options": {"delay_s": 1.5}},
        batching={"max_batch_size": 1},
        replica={"max_ongoing_requests": 1, "max_queued_requests": 1},
        ingress={"retry_after_s": 7},
    ))
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: post(url, {"prompt": f"p{i}"}), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}
    # At most one running plus one queued can succeed (Ray counts the queue at the
    # caller, so the queued slot may already be taken); the rest are turned away at once.
    assert 1 <= codes.count(200) <= 2
    assert codes.count(503) >= 4
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "7"
            assert response.json()["error"]["code"] == "overloaded"

