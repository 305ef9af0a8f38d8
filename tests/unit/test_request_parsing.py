import asyncio
import json

import pytest
from starlette.requests import Request

from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.generation.requests import plan_calls
from serve_app.generation.schemas import Text2ImageRequest
from serve_app.ingress.parsing import MAX_BODY_BYTES, read_request

CONFIG = AppConfig()
REFERENCE = {"prompt": "A panda listening to music with headphones. highly detailed, 8k.",
             "number": 1}


def http_request(raw: bytes, content_type: str | None = None) -> Request:
    """A POST with this body, as the ingress's routes receive it."""
    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}
    headers = [(b"content-length", str(len(raw)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers,
                    "query_string": b""}, receive)


def parse_request(raw: bytes, config: AppConfig, model=Text2ImageRequest, limit=None):
    """The body read by read_request, as a route reads it (`limit`: the image-body limit
    read_request applies itself)."""
    return asyncio.run(read_request(http_request(raw), model, config))


def parse(data):
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return parse_request(raw, CONFIG)


def rejected_field(data):
    with pytest.raises(InvalidRequest) as info:
        parse(data)
    assert info.value.status_code == 422
    return info.value.field


def test_reference_request_gets_defaults():
    request = parse(REFERENCE)
    assert (request.number, request.size, request.step, request.batch, request.seed) == (
        1, "512x512", 4, 1, None)


@pytest.mark.parametrize("data,field", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "p", "size": "640x640"}, "size"),
    ({"prompt": "p", "size": 512}, "size"),
    ({"prompt": "p", "step": 0}, "step"),
    ({"prompt": "p", "step": 51}, "step"),
    ({"prompt": "p", "step": "4"}, "step"),
    ({"prompt": "p", "step": 2.5}, "step"),
    ({"prompt": "p", "step": True}, "step"),
    ({"prompt": "p", "number": 0}, "number"),
    ({"prompt": "p", "batch": -1}, "batch"),
    ({"prompt": "p", "number": 2, "batch": 9}, "batch"),
    ({"prompt": "p", "number": 3, "batch": 6}, "number"),
    ({"prompt": "p", "seed": -1}, "seed"),
    ({"prompt": "p", "steps": 4}, "steps"),
])
def test_bad_fields_are_named(data, field):
    assert rejected_field(data) == field


@pytest.mark.parametrize("raw,message", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"", "not valid JSON"),
])
def test_bad_bodies(raw, message):
    with pytest.raises(InvalidRequest, match=message) as info:
        parse(raw)
    assert info.value.field == "body"


def test_oversized_body():
    with pytest.raises(PayloadTooLarge) as info:
        parse(b" " * (MAX_BODY_BYTES + 1))
    assert info.value.status_code == 413


def test_plan_calls_one_call_per_number():
    request = parse({"prompt": "p", "number": 3, "batch": 2, "size": "1024x1024", "step": 2})
    calls = plan_calls(request, seed=7)
    assert [(c.call_index, c.count, c.width, c.height, c.steps, c.seed) for c in calls] == [
        (0, 2, 1024, 1024, 2, 7), (1, 2, 1024, 1024, 2, 7), (2, 2, 1024, 1024, 2, 7)]


@pytest.mark.parametrize("raw,message", [
    (b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "body is nested too deeply"),
    (b'{"prompt": "p", "seed": ' + b"9" * 5000 + b"}", "body has a number out of range"),
    (b'{"prompt": "p", "step": ' + b"1" * 5000 + b"}", "body has a number out of range"),
])
def test_pathological_json_is_a_422_on_the_body(raw, message):
    """Bodies that once escaped as 500s: Python's recursion limit and its limit on the
    digits of an integer."""
    assert len(raw) < MAX_BODY_BYTES
    with pytest.raises(InvalidRequest) as info:
        parse_request(raw, CONFIG)
    assert (info.value.status_code, info.value.field) == (422, "body")
    assert str(info.value).startswith(message)


def _chunks(sizes, pulled):
    async def gen():
        for size in sizes:
            pulled.append(size)
            yield b"x" * size
    return gen()


def test_read_body_stops_a_chunked_body_at_the_limit():
    import asyncio

    from serve_app.ingress.parsing import read_body

    pulled: list[int] = []
    # 100 MB in 64 KiB chunks, no Content-Length (chunked transfer encoding).
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(_chunks([65536] * 1600, pulled), None))
    assert len(pulled) == 2  # stopped at the chunk that crossed 64 KiB, not at 100 MB
    pulled.clear()
    assert asyncio.run(read_body(_chunks([1000, 24], pulled), None)) == b"x" * 1024
    pulled.clear()
    exact = asyncio.run(read_body(_chunks([MAX_BODY_BYTES], pulled), None))
    assert len(exact) == MAX_BODY_BYTES


def test_read_body_refuses_a_declared_length_before_reading():
    import asyncio

    from serve_app.ingress.parsing import read_body

    pulled: list[int] = []
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(_chunks([10], pulled), str(MAX_BODY_BYTES + 1)))
    assert pulled == []
