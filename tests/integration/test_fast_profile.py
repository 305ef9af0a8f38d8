"""model.profile fast behind real Ray Serve with the embedded tiny model, on torch and on
OpenVINO: /readyz says which profile and parts run, and text-to-image, image-to-image and
the streamed step previews all work with the tiny VAE (the embedded random-weight one)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.config import ModelConfig
from serve_app.model import cpu
from serve_app.model.openvino.runtime import dynamic_quantization_group
from tests.integration.conftest import deployed_app, post, ready_within
from tests.integration.test_streaming import events_of, png

TINY_VAE = "tiny (embedded:tiny-taesd)"


def fast_weights() -> tuple[str, str]:
    """What profile fast picks for the UNet on OpenVINO on this host's CPU class (the
    replica runs here, so it sees the class the test sees, cap included)."""
    return ModelConfig(profile="fast").resolve_weights(cpu.host().cpu_class)


def run_fast(serve_url: str, name: str, backend: str, tmp: Path,
             weights: str | None = None) -> dict:
    from ray import serve

    openvino = {"cache_dir": str(tmp / "ir"), **({"weights": weights} if weights else {})}
    args = {
        "model": {"cache_dir": str(tmp / "model"), "backend": backend, "profile": "fast",
                  "openvino": openvino},
        "replica": {"num_cpus": 2},
        "ingress": {"num_cpus": 0.1},
        "store": {"url": str(tmp / "store")},
    }
    with deployed_app(serve_url, name, args) as url:
        ready = ready_within(url, 180)
        info = serve.get_deployment_handle("Text2ImageModel", app_name=name) \
            .info.remote().result()
        text = post(url, {"prompt": "fast", "seed": 7, "size": "512x512", "step": 2})
        text_png = httpx.get(text.json()["output"][0]["url"], timeout=30) \
            if text.status_code == 200 else None
        image = httpx.post(f"{url}/api/image2image", timeout=120, json={
            "prompt": "fast", "seed": 7, "strength": 0.5, "step": 2,
            "image": base64.b64encode(png(256, 256)).decode()})
        image_png = httpx.get(image.json()["output"][0]["url"], timeout=30) \
            if image.status_code == 200 else None
        stream = httpx.post(f"{url}/api/text2image/stream?preview=true",
                            json={"prompt": "fast", "seed": 7, "size": "512x512", "step": 2},
                            timeout=120)
        events = events_of(stream)
        stream_png = httpx.get(events[-1][1]["output"][0]["url"], timeout=30) \
            if events and events[-1][0] == "result" else None
        return {"ready": ready, "info": info, "text": text, "text_png": text_png,
                "image": image, "image_png": image_png, "events": events,
                "stream_png": stream_png}


@pytest.fixture(scope="module")
def torch_fast(serve_url, tmp_path_factory) -> dict:
    return run_fast(serve_url, "fast-torch", "torch", tmp_path_factory.mktemp("fast-torch"))


@pytest.fixture(scope="module")
def openvino_fast(serve_url, tmp_path_factory) -> dict:
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -e "
                                           "'.[openvino]'")
    return run_fast(serve_url, "fast-openvino", "openvino",
                    tmp_path_factory.mktemp("fast-openvino"))


@pytest.fixture(scope="module")
def openvino_fast_int8(serve_url, tmp_path_factory) -> dict:
    """profile fast with int8 weights asked for: what the profile picks on avx512_bf16, and
    the memory-saving choice on every other class."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -e "
                                           "'.[openvino]'")
    return run_fast(serve_url, "fast-openvino-int8", "openvino",
                    tmp_path_factory.mktemp("fast-openvino-int8"), weights="int8")


def check_images(run: dict) -> None:
    assert run["text"].status_code == 200, run["text"].text
    image = Image.open(io.BytesIO(run["text_png"].content))
    assert (image.format, image.size) == ("PNG", (512, 512))
    assert np.asarray(image).std() > 0  # not a blank image
    assert run["image"].status_code == 200, run["image"].text
    assert Image.open(io.BytesIO(run["image_png"].content)).size == (512, 512)
    events = run["events"]
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2]
    assert all("preview" in p for p in progress)
    assert events[-1][0] == "result"
    # The stream's result is the plain endpoint's image (same seed, same steps).
    assert run["stream_png"].content == run["text_png"].content


def test_fast_on_torch_reports_its_parts_and_decodes_with_the_tiny_vae(torch_fast):
    ready = torch_fast["ready"]
    assert ready.status_code == 200
    body = ready.json()
    dtype = cpu.choose_dtype("auto", "cpu", cpu.host()).name
    # torch's own int8 UNet layers where they measured faster on this class (avx2).
    int8, int8_reason = ModelConfig(profile="fast").resolve_torch_int8(cpu.host().cpu_class)
    assert (body["profile"], body["parts"], body["backend"]) == (
        "fast", {"unet": "int8" if int8 else dtype, "vae": TINY_VAE}, "torch")
    assert ("int8_unet" in body["optimizations"]["applied"]) == int8
    # int8 weights are an OpenVINO part: torch says so instead of pretending; where the
    # class's pick is the dtype's weights, it says why, unless int8 layers run anyway. So
    # for int8 layers not run.
    weights, reason = fast_weights()
    expected = {}
    if weights == "int8":
        expected["int8_weights"] = ("int8 weights run on backend openvino; backend torch runs "
                                    f"{'int8 layers' if int8 else dtype}")
    elif not int8:
        expected["int8_weights"] = reason
    if not int8:
        expected["int8_unet"] = int8_reason
    assert body["optimizations"]["skipped"] == expected
    check_images(torch_fast)


def test_fast_on_openvino_runs_the_classes_weights_and_the_tiny_vaes_own_ir(openvino_fast):
    """int8 weights where they measured faster on this CPU class (avx512_bf16), the dtype's
    elsewhere (avx2), with the reason in /readyz and the replica's info."""
    ready = openvino_fast["ready"]
    assert ready.status_code == 200
    body = ready.json()
    dtype = cpu.choose_dtype("auto", "cpu", cpu.host()).name
    weights, weights_reason = fast_weights()
    int8 = weights == "int8"
    assert (body["profile"], body["parts"], body["backend"], body["dtype"]) == (
        "fast", {"unet": "int8" if int8 else dtype, "vae": TINY_VAE}, "openvino", dtype)
    group, reason = dynamic_quantization_group(None, "int8" if int8 else None,
                                               cpu.host().cpu_class)
    assert body["optimizations"] == {
        "applied": ["openvino_ir", *(["int8_weights"] if int8 else []),
                    *([f"dynamic_quantization_{group}"] if group else []),
                    "compiled_cache", "prompt_cache"],
        "skipped": {} if int8 else {"int8_weights": weights_reason}}
    openvino = openvino_fast["info"]["openvino"]
    assert (openvino["weights"], openvino["weights_reason"]) == (weights, weights_reason)
    assert openvino["dynamic_quantization"] == reason
    assert openvino["properties"]["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == group
    ir, tiny = Path(openvino["ir"]), Path(openvino["tiny_vae_ir"])
    assert ir.name.startswith(f"{dtype}-{'int8' if int8 else 'dtype'}-")
    assert tiny.name.startswith(f"tiny_vae-{dtype}-")
    assert tiny.parent == ir.parent
    assert sorted(p.name for p in tiny.glob("*.xml")) == ["tiny_vae_decoder.xml",
                                                         "tiny_vae_encoder.xml"]
    check_images(openvino_fast)


def test_fast_with_int8_weights_runs_them_and_the_tiny_vaes_own_ir_on_every_class(
        openvino_fast_int8):
    """The int8 path end to end whatever the host's class (profile fast picks it on
    avx512_bf16 only): int8 weights, the class's dynamic quantization, the tiny VAE's IR."""
    ready = openvino_fast_int8["ready"]
    assert ready.status_code == 200
    body = ready.json()
    dtype = cpu.choose_dtype("auto", "cpu", cpu.host()).name
    assert (body["profile"], body["parts"], body["backend"], body["dtype"]) == (
        "fast", {"unet": "int8", "vae": TINY_VAE}, "openvino", dtype)
    group, reason = dynamic_quantization_group(None, "int8", cpu.host().cpu_class)
    assert body["optimizations"] == {
        "applied": ["openvino_ir", "int8_weights",
                    *([f"dynamic_quantization_{group}"] if group else []),
                    "compiled_cache", "prompt_cache"],
        "skipped": {}}
    openvino = openvino_fast_int8["info"]["openvino"]
    assert (openvino["weights"], openvino["weights_reason"]) == (
        "int8", "configured (model.openvino.weights)")
    assert openvino["dynamic_quantization"] == reason
    assert openvino["properties"]["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == group
    ir, tiny = Path(openvino["ir"]), Path(openvino["tiny_vae_ir"])
    assert ir.name.startswith(f"{dtype}-int8-") and tiny.name.startswith(f"tiny_vae-{dtype}-")
    assert tiny.parent == ir.parent
    assert sorted(p.name for p in tiny.glob("*.xml")) == ["tiny_vae_decoder.xml",
                                                         "tiny_vae_encoder.xml"]
    check_images(openvino_fast_int8)
