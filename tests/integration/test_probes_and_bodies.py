"""Probes and request bodies as new users and their infrastructure send them: HEAD probes,
a readiness probe while the model loads, pathological JSON and chunked uploads."""

import time

import httpx
import pytest

from tests.integration.conftest import fake_args


@pytest.mark.parametrize("path,content_type", [
    ("/healthz", "application/json"), ("/readyz", "application/json"),
    ("/", "text/html; charset=utf-8"), ("/openapi.json", "application/json")])
def test_head_is_answered_wherever_get_is(fake_app, path, content_type):
    get = httpx.get(f"{fake_app}{path}", timeout=30)
    head = httpx.head(f"{fake_app}{path}", timeout=30)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-type"] == content_type
    assert int(head.headers["content-length"]) == len(get.content) > 0


def test_head_on_an_image_and_on_a_post_only_route(fake_app):
    from tests.integration.conftest import post

    url = post(fake_app, {"prompt": "p"}).json()["output"][0]["url"]
    head = httpx.head(url)
    assert (head.status_code, head.headers["content-type"], head.content) == (
        200, "image/png", b"")
    assert int(head.headers["content-length"]) == len(httpx.get(url).content)
    post_only = httpx.head(f"{fake_app}/api/text2image")
    assert (post_only.status_code, post_only.headers["allow"]) == (405, "POST")


@pytest.mark.parametrize("route", ["/api/text2image", "/api/jobs"])
@pytest.mark.parametrize("raw,message", [
    (b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "body is nested too deeply"),
    (b'{"prompt": "p", "seed": ' + b"7" * 5000 + b"}", "body has a number out of range"),
    (b'{"prompt": "p", "step": ' + b"3" * 5000 + b"}", "body has a number out of range"),
])
def test_pathological_json_gets_422_not_500(fake_app, route, raw, message):
    response = httpx.post(f"{fake_app}{route}", content=raw, timeout=30)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", "body")
    assert error["message"].startswith(message)


def _chunked_upload(url: str) -> int | str:
    """100 MB sent chunked (no Content-Length). Returns the status, or the error's name
    when the server closed the connection mid-upload (refused, as it should be)."""
    def body():
        for _ in range(1600):
            yield b"x" * 65536

    try:
        response = httpx.post(f"{url}/api/text2image", content=body(), timeout=60)
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return type(exc).__name__
    assert response.json()["error"]["code"] == "payload_too_large"
    return response.status_code


def test_chunked_uploads_are_refused_past_the_limit_and_accepted_under_it(fake_app):
    """Chunked bodies (no Content-Length) meet the same 64 KiB limit: a 100 MB upload gets
    413 (the reader stops at the limit: tests/unit/test_request_parsing.py), a small one is
    served. Ray Serve itself still queues what the client sends until the response is out;
    README says to cap bodies at the load balancer too."""
    assert _chunked_upload(fake_app) in (413, "WriteError", "RemoteProtocolError",
                                         "ReadError")

    def small():
        yield b'{"prompt": '
        yield b'"chunked"}'

    response = httpx.post(f"{fake_app}/api/text2image", content=small(), timeout=60)
    assert response.status_code == 200
    assert response.json()["meta"]["input"]["prompt"] == "chunked"


def test_readyz_answers_at_once_while_the_model_loads(deployed, tmp_path):
    """Kubernetes gives a probe 1 s: while no replica has answered, /readyz says 503 at
    once (it used to wait up to 3 s), then 200 once the model has loaded."""
    app_url = deployed("loading", fake_args(tmp_path, model={"generator_options": {"load_s": 8.0}}),
                       blocking=False)
    url = f"{app_url}/readyz"
    deadline = time.monotonic() + 90
    # Until the ingress itself answers, the proxy holds requests: not what is measured.
    while httpx.get(f"{app_url}/healthz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the ingress never came up"
        time.sleep(0.2)
    seen: list[tuple[int, float]] = []
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = httpx.get(url, timeout=5)
        seen.append((response.status_code, time.perf_counter() - started))
        if response.status_code == 200:
            break
        assert response.json()["error"]["message"] == "model is loading"
        time.sleep(0.3)
    codes = [code for code, _ in seen]
    assert codes[-1] == 200 and set(codes[:-1]) == {503}, codes
    assert codes.count(503) >= 3, seen  # the ingress was up well before the model
    slow = [round(s, 2) for code, s in seen if code == 503 and s > 0.9]
    assert slow == [], seen
