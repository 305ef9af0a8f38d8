"""End to end: real Ray Serve, real HTTP on loopback, real diffusers with the tiny model."""

import io
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.bench.load import parse_server_timing
from serve_app.model import cpu
from tests.integration.conftest import REFERENCE_PROMPT, post, ready_within


def fetch_png(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_reference_curl_returns_the_schema_and_a_512_png(tiny_app):
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{tiny_app}/api/text2image", "-d",
         '{"prompt": "%s", "number": 1}' % REFERENCE_PROMPT],
        capture_output=True, text=True, timeout=120, check=True)
    import json

    body = json.loads(out.stdout)
    assert set(body) == {"id", "averageImageGenerationTimeSeconds", "generationTimeSeconds",
                         "meta", "output", "gridUrl", "status"}
    assert body["status"] == "success"
    assert len(body["id"]) == 32
    meta = body["meta"]["input"]
    assert {k: meta[k] for k in ("batch", "model", "number", "prompt", "size", "step")} == {
        "batch": 1, "model": "embedded:tiny-sdxl", "number": 1, "prompt": REFERENCE_PROMPT,
        "size": "512x512", "step": 4}
    assert body["gridUrl"] is None
    assert len(body["output"]) == 1
    assert body["output"][0]["url"] == f"{tiny_app}/images/{body['id']}/0_0.png"
    assert body["output"][0]["latencySeconds"] > 0
    assert body["generationTimeSeconds"] >= body["averageImageGenerationTimeSeconds"] > 0
    image = fetch_png(body["output"][0]["url"])
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (512, 512))


def test_number_2_gives_two_images_and_a_grid(tiny_app):
    response = post(tiny_app, {"prompt": "two cats", "number": 2, "seed": 3})
    assert response.status_code == 200
    body = response.json()
    urls = [o["url"] for o in body["output"]]
    assert [u.rsplit("/", 1)[1] for u in urls] == ["0_0.png", "1_0.png"]
    first, second = (np.asarray(fetch_png(u)) for u in urls)
    assert first.shape == second.shape == (512, 512, 3)
    assert not np.array_equal(first, second)
    grid = np.asarray(fetch_png(body["gridUrl"]))
    assert body["gridUrl"] == f"{tiny_app}/images/{body['id']}/image_grid.png"
    assert grid.shape == (512, 1024, 3)
    assert np.array_equal(grid[:, :512], first) and np.array_equal(grid[:, 512:], second)


def test_number_times_batch_images(tiny_app):
    response = post(tiny_app, {"prompt": "p", "number": 2, "batch": 2, "step": 1})
    names = [o["url"].rsplit("/", 1)[1] for o in response.json()["output"]]
    assert names == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]


def test_1024_gives_1024_images(tiny_app):
    response = post(tiny_app, {"prompt": "big", "size": "1024x1024", "step": 1})
    assert response.status_code == 200
    assert fetch_png(response.json()["output"][0]["url"]).size == (1024, 1024)
    # Where the time went, for the load benchmark's per-request overhead figure.
    timings = parse_server_timing(response.headers["server-timing"])
    assert list(timings) == ["pipeline", "model", "store"]
    assert 0 < timings["pipeline"] <= timings["model"]
    assert timings["model"] == pytest.approx(response.json()["generationTimeSeconds"], abs=1e-3)
    assert timings["store"] > 0
    # One request id header (Ray Serve's), not a second, different one from the ingress.
    assert len(response.headers.get_list("x-request-id")) == 1


def test_same_seed_gives_the_same_bytes(tiny_app):
    body = {"prompt": "a lighthouse", "seed": 1234, "step": 2}
    first, second = post(tiny_app, body).json(), post(tiny_app, body).json()
    assert first["id"] != second["id"]
    assert first["meta"]["input"]["seed"] == 1234
    a = httpx.get(first["output"][0]["url"]).content
    b = httpx.get(second["output"][0]["url"]).content
    assert a == b
    other = post(tiny_app, {**body, "seed": 1235}).json()
    assert httpx.get(other["output"][0]["url"]).content != a


def test_concurrent_requests_are_batched(tiny_app):
    from ray import serve

    batcher = serve.get_deployment_handle("Batcher", app_name="tiny")
    model = serve.get_deployment_handle("Text2ImageModel", app_name="tiny")
    # args.batching reached the batcher as user_config, through reconfigure().
    assert batcher.stats.remote().result()["batching"] == {
        "max_batch_size": 8, "batch_wait_timeout_s": 0.5, "max_images_per_call": 8,
        "max_batch_image_steps": 16.0, "job_max_wait_s": 30.0}
    before = model.stats.remote().result()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda i: post(tiny_app, {"prompt": f"prompt {i}", "step": 2, "seed": i}),
            range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    after = model.stats.remote().result()
    new_batches = after["batch_sizes"][len(before["batch_sizes"]):]
    assert sum(new_batches) == 8
    assert len(new_batches) < 8
    assert max(new_batches) > 1
    # One shape per batch: each batch is exactly one pipeline call.
    assert after["pipeline_calls"] - before["pipeline_calls"] == len(new_batches)


def test_mixed_shapes_never_share_a_batch(tiny_app):
    """Calls of two step counts arrive together: the batcher forms batches of one shape
    (a mixed batch would run its shapes one after another, the short ones waiting)."""
    from ray import serve

    model = serve.get_deployment_handle("Text2ImageModel", app_name="tiny")
    bodies = [{"prompt": "a", "step": 1}, {"prompt": "b", "step": 2},
              {"prompt": "c", "step": 1}, {"prompt": "d", "step": 2}] * 2
    before = model.stats.remote().result()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(tiny_app, b), bodies))
    assert [r.status_code for r in responses] == [200] * 8
    after = model.stats.remote().result()
    shapes = after["batch_shapes"][len(before["batch_shapes"]):]
    assert sorted(step for batch in shapes for (_, _, step) in batch) == [1] * 4 + [2] * 4
    assert [len(set(map(tuple, batch))) for batch in shapes] == [1] * len(shapes)
    assert max(len(batch) for batch in shapes) > 1  # batching did happen
    assert after["pipeline_calls"] - before["pipeline_calls"] == len(shapes)
    for response, body in zip(responses, bodies):
        assert response.json()["meta"]["input"]["step"] == body["step"]


def test_ready_reports_backend_dtype_and_threads_equal_to_num_cpus(tiny_app):
    """The default config (`backend: auto`, `dtype: auto`): on the CPU classes where
    OpenVINO measured fastest it serves on OpenVINO, elsewhere on torch with the levers."""
    from serve_app.model.backend import OPENVINO_MEASURED_FASTER

    response = ready_within(tiny_app)
    assert response.status_code == 200
    # The replica runs on this host, so it sees the CPU the test sees (and the same cap).
    caps = cpu.host()
    choice = cpu.choose_dtype("auto", "cpu", caps)
    assert choice.name == ("bfloat16" if caps.native_bf16 else "float32")
    body = response.json()
    reason = body.pop("backendReason")
    common = {"status": "ready", "busy": False, "model": "embedded:tiny-sdxl",
              "dtype": choice.name, "cpu": caps.describe(), "device": "cpu", "threads": 2,
              "tee": None, "warnings": [],
              # The session's test broker is plain redis://, the store a local directory.
              "protections": {"confidential": False, "brokerTls": "none",
                              "storeEncryption": "none", "storeTls": False,
                              "acceptedRisks": []},
              "profile": "quality"}

    def models(backend: str) -> list[dict]:
        return [{"id": "sdxl-turbo", "default": True, "source": "embedded", "loras": 0,
                 "loaded": True, "backend": backend, "dtype": choice.name}]
    if caps.cpu_class in OPENVINO_MEASURED_FASTER:
        assert reason.startswith("auto: OpenVINO 20")
        assert reason.endswith(f" measured fastest on {caps.cpu_class} CPUs "
                               f"({OPENVINO_MEASURED_FASTER[caps.cpu_class]})")
        assert body == {**common, "backend": "openvino", "models": models("openvino"),
                        "parts": {"unet": choice.name, "vae": "full"},
                        "dtypeReason": f"{choice.reason}; OpenVINO CPU "
                                       f"INFERENCE_PRECISION_HINT {choice.name}",
                        "optimizations": {"applied": ["openvino_ir", "compiled_cache",
                                                      "prompt_cache"],
                                          "skipped": {}}}
    else:
        assert reason.startswith(f"auto: OpenVINO not measured on {caps.cpu_class} CPUs; ")
        assert body == {**common, "backend": "torch", "dtypeReason": choice.reason,
                        "models": models("torch"),
                        "parts": {"unet": choice.name, "vae": "full"},
                        "optimizations": {"applied": ["fuse_attention",
                                                      "cross_attention_kv_cache",
                                                      "fuse_geglu", "prepack_linear",
                                                      "channels_last", "prepack_conv",
                                                      "prompt_cache"], "skipped": {}}}
    assert httpx.get(f"{tiny_app}/healthz").json() == {"status": "ok"}
