"""POST /api/image2image end to end: real Ray Serve, HTTP on loopback, the real diffusers
pipeline with the tiny model; untrusted input images each get a clear 4xx and the service
keeps serving."""

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import fake_args, post, wait_done


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A PNG declaring width x height, its pixel data a few KB of zlib-compressed zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (4 * 1024 * 1024), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(
        b"IEND", b"")


def edit(url: str, image: bytes, **fields) -> httpx.Response:
    body = {"prompt": "a watercolour", "image": base64.b64encode(image).decode(), **fields}
    return httpx.post(f"{url}/api/image2image", json=body, timeout=120)


def fetch(url: str) -> bytes:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    return response.content


def test_json_image_to_image_returns_the_text_to_image_schema(tiny_app):
    response = edit(tiny_app, png(640, 480), strength=0.5, step=4, seed=11, number=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "averageImageGenerationTimeSeconds", "generationTimeSeconds",
                         "meta", "output", "gridUrl", "status"}
    assert body["meta"]["input"] == {
        "batch": 1, "model": "embedded:tiny-sdxl", "modelId": "sdxl-turbo", "number": 2,
        "prompt": "a watercolour", "size": "512x512", "step": 4, "seed": 11, "strength": 0.5}
    assert [o["url"].rsplit("/", 1)[1] for o in body["output"]] == ["0_0.png", "1_0.png"]
    image = Image.open(io.BytesIO(fetch(body["output"][0]["url"])))
    assert (image.format, image.size) == ("PNG", (512, 512))
    grid = Image.open(io.BytesIO(fetch(body["gridUrl"])))
    assert grid.size == (1024, 512)


def test_the_same_seed_gives_the_same_bytes_and_the_input_matters(tiny_app):
    source = png(512, 512, seed=1)
    first = edit(tiny_app, source, seed=7, strength=0.75).json()
    second = edit(tiny_app, source, seed=7, strength=0.75).json()
    other_input = edit(tiny_app, png(512, 512, seed=2), seed=7, strength=0.75).json()
    a, b, c = (fetch(r["output"][0]["url"]) for r in (first, second, other_input))
    assert a == b
    assert a != c


def test_multipart_upload(tiny_app):
    response = httpx.post(
        f"{tiny_app}/api/image2image",
        data={"prompt": "a sketch", "strength": "0.5", "step": "2", "seed": "3",
              "size": "1024x1024"},
        files={"image": ("in.jpg", png(300, 200), "image/png")}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["meta"]["input"]["strength"], body["meta"]["input"]["step"]) == (0.5, 2)
    image = Image.open(io.BytesIO(fetch(body["output"][0]["url"])))
    assert image.size == (1024, 1024)


def test_bad_images_get_4xx_and_the_service_keeps_serving(tiny_app):
    truncated = png(256, 256)[:-400]
    cases = {
        "not an image": (b"this is plain text, not an image" * 4, 422, "invalid_image"),
        "1x1": (png(1, 1), 422, "invalid_image"),
        "10000x10000": (bomb(10000, 10000), 422, "invalid_image"),
        "decompression bomb": (bomb(60000, 60000), 422, "invalid_image"),
        "truncated": (truncated, 422, "invalid_image"),
        # just over limits.max_input_image_bytes (8 MiB): the body itself is within its limit
        "too many bytes": (b"\x89PNG\r\n\x1a\n" + bytes(8 * 1024 * 1024), 413,
                           "payload_too_large"),
    }
    for name, (data, status, code) in cases.items():
        response = edit(tiny_app, data)
        assert (name, response.status_code) == (name, status), response.text
        error = response.json()["error"]
        assert (name, error["code"], error["field"]) == (name, code, "image")
    response = edit(tiny_app, bytes(12 * 1024 * 1024))  # the body is over its own limit
    assert (response.status_code, response.json()["error"]["field"]) == (413, "body")
    files = {"image": ("x.png", png(1, 1), "image/png")}
    response = httpx.post(f"{tiny_app}/api/image2image", data={"prompt": "p"}, files=files,
                          timeout=60)
    assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_image")
    response = edit(tiny_app, png(128, 128), step=1, strength=0.5)
    assert (response.status_code, response.json()["error"]["field"]) == (422, "strength")
    # Still serving, both kinds.
    assert edit(tiny_app, png(128, 128), step=2).status_code == 200
    assert post(tiny_app, {"prompt": "still here", "step": 1}).status_code == 200


def test_an_image_to_image_job(tiny_app):
    source = png(512, 512, seed=4)
    body = {"prompt": "a job", "image": base64.b64encode(source).decode(), "strength": 0.5,
            "step": 4, "seed": 9}
    response = httpx.post(f"{tiny_app}/api/jobs", json=body, timeout=60)
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["progress"]["stepsTotal"] == 2  # 4 steps at strength 0.5
    record = wait_done(submitted["statusUrl"], timeout_s=120)
    assert record["status"] == "succeeded", record
    assert record["progress"]["stepsDone"] == 2
    assert record["result"]["meta"]["input"]["strength"] == 0.5
    direct = edit(tiny_app, source, strength=0.5, step=4, seed=9, prompt="a job").json()
    # the same seeded call through the job path and the direct path: the same bytes
    assert fetch(record["result"]["output"][0]["url"]) == fetch(direct["output"][0]["url"])
    bad = httpx.post(f"{tiny_app}/api/jobs", json={**body, "image": base64.b64encode(
        png(1, 1)).decode()}, timeout=60)
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_image")


@pytest.fixture
def image_host() -> Iterator[tuple[str, list[str], dict[str, bytes]]]:
    """A loopback image server: (its URL, the paths asked for, path -> PNG); /hop
    redirects to /a.png."""
    images = {"/a.png": png(200, 120, seed=21), "/b.png": png(200, 120, seed=22)}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "/a.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits, images
    server.shutdown()
    server.server_close()


def test_image_url_through_serve_gives_the_bytes_of_the_image_inline(deployed, tmp_path,
                                                                     image_host):
    """Real Ray Serve, the fake generator (its output blends the input image the model
    replica decoded): an imageUrl, fetched by the ingress replica from a loopback server
    (the private-address opt-in set for it), gives the same PNG as the same image inline,
    directly, through a redirect, and as an async job; the guard still refuses what it
    must, with JSON errors naming imageUrl."""
    host, hits, images = image_host
    url = deployed("image-url", fake_args(tmp_path, ingress={"image_url": {
        "allow_private": True, "hosts": ["127.0.0.1"]}}))
    fields = {"prompt": "a watercolour", "strength": 0.5, "step": 2, "seed": 13}

    def output(body: dict) -> bytes:
        response = httpx.post(f"{url}/api/image2image", json={**fields, **body}, timeout=60)
        assert response.status_code == 200, response.text
        return fetch(response.json()["output"][0]["url"])

    inline = output({"image": base64.b64encode(images["/a.png"]).decode()})
    assert output({"imageUrl": f"{host}/a.png"}) == inline
    assert output({"imageUrl": f"{host}/hop"}) == inline
    assert output({"imageUrl": f"{host}/b.png"}) != inline  # the input matters
    assert hits == ["/a.png", "/hop", "/a.png", "/b.png"]
    job = httpx.post(f"{url}/api/jobs", json={**fields, "imageUrl": f"{host}/a.png"},
                     timeout=60)
    assert job.status_code == 202, job.text
    record = wait_done(job.json()["statusUrl"], timeout_s=60)
    assert record["status"] == "succeeded", record
    assert record["request"]["imageUrl"] is None
    assert fetch(record["result"]["output"][0]["url"]) == inline
    assert len(hits) == 5  # fetched once, at submission
    for body, status, code in [
            ({"imageUrl": "file:///etc/passwd"}, 422, "image_url_refused"),
            ({"imageUrl": "http://localhost:9/a.png"}, 422, "image_url_refused"),
            ({"imageUrl": f"{host}/missing.png"}, 422, "image_url_failed"),
            ({"imageUrl": f"{host}/a.png", "image": "AAAA"}, 422, "invalid_request")]:
        response = httpx.post(f"{url}/api/image2image", json={**fields, **body}, timeout=60)
        error = response.json()["error"]
        assert (response.status_code, error["code"], error["field"]) == (status, code,
                                                                         "imageUrl")
    assert hits == ["/a.png", "/hop", "/a.png", "/b.png", "/a.png", "/missing.png"]
