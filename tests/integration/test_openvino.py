"""model.backend openvino behind real Ray Serve, with the embedded tiny model: the first
deployment exports the IR (in a subprocess of its model replica), a second one starts from
the cached IR without exporting, and both serve the same PNG for the same seed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.model import cpu
from tests.integration.conftest import REFERENCE_PROMPT, deploy, post, ready_within

pytest.importorskip("openvino", reason="openvino is not installed: pip install -e '.[openvino]'")

BODY = {"prompt": REFERENCE_PROMPT, "number": 1, "seed": 4242}


def ov_args(paths: dict[str, Path]) -> dict:
    return {
        "model": {"cache_dir": str(paths["model"]), "backend": "openvino",
                  "openvino": {"cache_dir": str(paths["ir"])}},
        "replica": {"num_cpus": 2},
        "ingress": {"num_cpus": 0.1},
        "store": {"url": str(paths["store"])},
    }


def run_app(name: str, paths: dict[str, Path]) -> dict:
    """Deploy at /<name>, read /readyz, the replica's info and one image, then delete it
    (two model replicas at once would not fit the test cluster beside the others)."""
    from ray import serve

    try:
        deploy(name, f"/{name}", ov_args(paths))
        base = paths["serve_url"]
        ready = ready_within(f"{base}/{name}")
        info = serve.get_deployment_handle("Text2ImageModel", app_name=name) \
            .info.remote().result()
        response = post(f"{base}/{name}", BODY)
        body = response.json()
        png = httpx.get(body["output"][0]["url"], timeout=30) if response.status_code == 200 \
            else None
        ir = Path(info["openvino"]["ir"])
        source = io.BytesIO()
        Image.new("RGB", (128, 128), (9, 99, 199)).save(source, "PNG")
        import base64

        img2img = httpx.post(f"{base}/{name}/api/image2image", timeout=60, json={
            "prompt": "p", "seed": 5, "image": base64.b64encode(source.getvalue()).decode()})
        img2img_png = httpx.get(img2img.json()["output"][0]["url"], timeout=30) \
            if img2img.status_code == 200 else None
        return {"ready": ready, "info": info, "response": response, "png": png,
                "img2img": img2img, "img2img_png": img2img_png,
                "mtimes": {p.name: p.stat().st_mtime_ns for p in ir.iterdir()},
                "compiled": {p.name: p.stat().st_mtime_ns for p in
                             Path(info["openvino"]["compiled_cache_dir"]).iterdir()}}
    finally:
        serve.delete(name)


@pytest.fixture(scope="module")
def paths(serve_url, tmp_path_factory) -> dict[str, Path]:
    return {"model": tmp_path_factory.mktemp("ov-model"), "ir": tmp_path_factory.mktemp("ov-ir"),
            "store": tmp_path_factory.mktemp("ov-images"), "serve_url": serve_url}


@pytest.fixture(scope="module")
def first(paths) -> dict:
    return run_app("openvino", paths)


@pytest.fixture(scope="module")
def second(paths, first) -> dict:
    return run_app("openvino-again", paths)


def test_readyz_reports_the_openvino_backend(first):
    assert first["ready"].status_code == 200
    ready = first["ready"].json()
    expected = cpu.choose_dtype("auto", "cpu", cpu.host()).name
    assert (ready["status"], ready["backend"], ready["dtype"], ready["threads"]) == (
        "ready", "openvino", expected, 2)
    assert ready["dtypeReason"].endswith(f"; OpenVINO CPU INFERENCE_PRECISION_HINT {expected}")
    assert ready["optimizations"] == {"applied": ["openvino_ir", "compiled_cache",
                                                  "prompt_cache"],
                                      "skipped": {}}


def test_the_first_deployment_exported_the_ir_into_the_shared_cache(first, paths):
    openvino = first["info"]["openvino"]
    assert openvino["exported"] is True
    ir = Path(openvino["ir"])
    assert ir.parent == paths["ir"]
    marker = json.loads((ir / "export.json").read_text())
    assert marker["pid"] == openvino["exported_by_pid"]


def test_text2image_returns_a_512_png(first):
    assert first["response"].status_code == 200
    assert first["response"].json()["status"] == "success"
    png = first["png"]
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (512, 512))
    assert np.asarray(image).std() > 0  # not a blank image


def test_a_second_deployment_starts_from_the_cached_ir(first, second):
    assert second["ready"].status_code == 200
    assert second["ready"].json()["backend"] == "openvino"
    openvino = second["info"]["openvino"]
    assert openvino["exported"] is False
    assert openvino["ir"] == first["info"]["openvino"]["ir"]
    # The IR was not written again, and it was the first deployment's export.
    assert second["mtimes"] == first["mtimes"]
    assert openvino["exported_by_pid"] == first["info"]["openvino"]["exported_by_pid"]
    # Same backend, same seed: the same PNG bytes.
    assert second["response"].status_code == 200
    assert second["png"].content == first["png"].content


def test_a_second_deployment_imports_the_compiled_networks(first, second, paths):
    """OpenVINO's compiled-model cache, per CPU class beside the IR: the first start wrote
    one blob per network, the second imported them (nothing written again)."""
    where = Path(first["info"]["openvino"]["compiled_cache_dir"])
    assert where == paths["ir"] / "compiled" / cpu.host().cpu_class
    assert len([name for name in first["compiled"] if name.endswith(".blob")]) == 5
    assert second["compiled"] == first["compiled"]
    assert second["info"]["openvino"]["compiled_cache_dir"] == str(where)


def test_image_to_image_runs_on_openvino(first, second):
    """The IR has the VAE encoder (format 2): image-to-image serves on this backend, and
    the same seed gives the same PNG on a second deployment from the cached IR."""
    assert first["info"]["img2img"] is True
    for run in (first, second):
        assert run["img2img"].status_code == 200, run["img2img"].text
    outputs = [run["img2img"].json()["output"] for run in (first, second)]
    assert [len(o) for o in outputs] == [1, 1]
    pngs = [run["img2img_png"].content for run in (first, second)]
    assert Image.open(io.BytesIO(pngs[0])).size == (512, 512)
    assert pngs[0] == pngs[1]
