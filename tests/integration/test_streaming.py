"""Server-Sent Events through real Ray Serve and HTTP: per-step progress and previews from
the real tiny pipeline, then the result; a job's events from its status."""

import base64
import io
import json

import httpx
import numpy as np
from PIL import Image

from tests.integration.conftest import post


def events_of(response: httpx.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines()
                     if not line.startswith(":"))
        if lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_text_to_image_stream_with_previews(tiny_app):
    body = {"prompt": "streamed", "step": 4, "seed": 21}
    response = httpx.post(f"{tiny_app}/api/text2image/stream?preview=true", json=body,
                          timeout=120)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response)
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert all(p["steps"] == 4 for p in progress)
    previews = [p["preview"] for p in progress if "preview" in p]
    assert previews, progress
    image = Image.open(io.BytesIO(base64.b64decode(previews[0].split(",", 1)[1])))
    assert (image.format, image.size) == ("PNG", (64, 64))
    name, result = events[-1]
    assert name == "result"
    # the same bytes as the plain endpoint with the same seed
    plain = post(tiny_app, body).json()
    assert httpx.get(result["output"][0]["url"]).content == httpx.get(
        plain["output"][0]["url"]).content


def test_without_preview_no_preview_is_sent(tiny_app):
    response = httpx.post(f"{tiny_app}/api/text2image/stream", json={"prompt": "p", "step": 2},
                          timeout=120)
    events = events_of(response)
    assert [(n, d["step"]) for n, d in events if n == "progress"] == [
        ("progress", 1), ("progress", 2)]
    assert not any("preview" in d for _, d in events)
    assert events[-1][0] == "result"


def test_image_to_image_stream(tiny_app):
    body = {"prompt": "p", "step": 4, "strength": 0.5, "number": 2,
            "image": base64.b64encode(png(256, 256)).decode()}
    events = events_of(httpx.post(f"{tiny_app}/api/image2image/stream?preview=true",
                                  json=body, timeout=120))
    # two calls of 2 denoising steps each
    assert [d["step"] for n, d in events if n == "progress"] == [1, 2, 3, 4]
    assert events[-1][0] == "result"
    assert events[-1][1]["meta"]["input"]["strength"] == 0.5


def test_invalid_requests_fail_before_the_stream(tiny_app):
    response = httpx.post(f"{tiny_app}/api/text2image/stream", json={"prompt": "p",
                                                                      "step": 0}, timeout=30)
    assert (response.status_code, response.json()["error"]["field"]) == (422, "step")
    response = httpx.post(f"{tiny_app}/api/image2image/stream",
                          json={"prompt": "p", "image": base64.b64encode(b"x" * 99).decode()},
                          timeout=30)
    assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_image")
    assert httpx.get(f"{tiny_app}/api/jobs/{'0' * 32}/events").status_code == 404


def test_job_events(tiny_app):
    submitted = httpx.post(f"{tiny_app}/api/jobs", json={"prompt": "job", "step": 3,
                                                         "number": 2}, timeout=30).json()
    response = httpx.get(f"{tiny_app}/api/jobs/{submitted['id']}/events", timeout=120)
    assert response.status_code == 200
    events = events_of(response)
    progress = [d for n, d in events if n == "progress"]
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and steps[-1] == 6
    assert progress[-1]["status"] == "succeeded"
    assert all(p["steps"] == 6 for p in progress)
    name, record = events[-1]
    assert (name, record["status"], record["id"]) == ("result", "succeeded", submitted["id"])
