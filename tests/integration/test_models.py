"""Several models in one service (issue 23), on real Ray Serve: two embedded tiny models
with different weights, chosen per request natively, by the OpenAI SDK and in jobs; model
replicas holding models through Ray Serve's multiplexing, evicting the least recently used
(by count and by memory), and the router sending a model's calls to the replica that holds
it. Each test fails if switching models breaks."""

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import (
    deployed_app,
    fake_args,
    post,
    ready_within,
    submit,
    wait_done,
)

BODY = {"prompt": "a red boat", "seed": 42, "step": 2, "size": "512x512"}
IDS = "['sdxl-turbo', 'tiny-b']"


@pytest.fixture(scope="module")
def two_models(serve_url, tmp_path_factory):
    """The quick start's shape: the embedded tiny model and a second one with other
    weights (embedded:tiny-sdxl-b)."""
    tmp = tmp_path_factory.mktemp("two-models")
    with deployed_app(serve_url, "twomodels", {
            "model": {"cache_dir": str(tmp / "model")},
            "models": [{"id": "tiny-b", "source": "embedded:tiny-sdxl-b"}],
            "replica": {"num_cpus": 1},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.3},
            "ingress": {"num_cpus": 0.1},
            "store": {"url": str(tmp / "store")}}) as url:
        yield url


def png_of(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    return httpx.get(response.json()["output"][0]["url"], timeout=30).content


def test_two_models_give_different_images_for_the_same_prompt_and_seed(two_models):
    default = post(two_models, BODY)
    other = post(two_models, {**BODY, "model": "tiny-b"})
    assert (default.json()["meta"]["input"]["modelId"],
            other.json()["meta"]["input"]["modelId"]) == ("sdxl-turbo", "tiny-b")
    assert other.json()["meta"]["input"]["model"] == "embedded:tiny-sdxl-b"
    a, b = png_of(default), png_of(other)
    assert a[:8] == b[:8] == b"\x89PNG\r\n\x1a\n"
    assert a != b
    # Each model is deterministic: switching back gives the same bytes again.
    assert png_of(post(two_models, {**BODY, "model": "sdxl-turbo"})) == a
    assert png_of(post(two_models, {**BODY, "model": "tiny-b"})) == b


def test_models_are_listed_and_an_unknown_one_is_refused_with_the_ids(two_models):
    listed = httpx.get(f"{two_models}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["default"], m["source"], m["loras"]) for m in listed] == [
        ("sdxl-turbo", True, "embedded", 0), ("tiny-b", False, "embedded", 0)]
    ready = ready_within(two_models).json()
    assert [(m["id"], m["default"]) for m in ready["models"]] == [
        ("sdxl-turbo", True), ("tiny-b", False)]
    assert all(isinstance(m["loaded"], bool) for m in ready["models"])
    refused = post(two_models, {**BODY, "model": "dall-e-2"})
    assert refused.status_code == 422
    assert refused.json()["error"] == {
        "code": "unknown_model", "field": "model",
        "message": f"model 'dall-e-2' is not served here; valid ids: {IDS}"}


def test_the_openai_sdk_switches_models_with_model(two_models):
    sdk = openai.OpenAI(base_url=f"{two_models}/v1", api_key="unused", max_retries=0,
                        timeout=120)
    extra = {"seed": BODY["seed"], "step": BODY["step"]}
    by_sdk = {name: base64.b64decode(sdk.images.generate(
        prompt=BODY["prompt"], model=name, response_format="b64_json", size="512x512",
        extra_body=extra).data[0].b64_json) for name in ("sdxl-turbo", "tiny-b")}
    assert by_sdk["sdxl-turbo"] != by_sdk["tiny-b"]
    # The same images the native API gives for the same model, prompt and seed.
    assert by_sdk["tiny-b"] == png_of(post(two_models, {**BODY, "model": "tiny-b"}))
    assert by_sdk["sdxl-turbo"] == png_of(post(two_models, BODY))
    assert [m.id for m in sdk.models.list().data] == ["sdxl-turbo", "tiny-b"]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="x", model="dall-e-3")
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": f"model 'dall-e-3' is not served here; valid ids: {IDS}",
        "type": "invalid_request_error", "param": "model", "code": "unknown_model"}


def test_a_job_for_the_other_model_makes_that_models_image(two_models):
    job = submit(two_models, {**BODY, "model": "tiny-b"})
    assert job.status_code == 202, job.text
    record = wait_done(job.json()["statusUrl"], 120)
    assert record["status"] == "succeeded", record
    assert record["request"]["model"] == "tiny-b"
    assert record["result"]["meta"]["input"]["modelId"] == "tiny-b"
    url = record["result"]["output"][0]["url"]
    assert httpx.get(url, timeout=30).content == png_of(post(two_models,
                                                             {**BODY, "model": "tiny-b"}))


def test_concurrent_calls_for_two_models_never_share_a_batch(two_models):
    from ray import serve

    batcher = serve.get_deployment_handle("Batcher", app_name="twomodels")
    model = serve.get_deployment_handle("Text2ImageModel", app_name="twomodels")
    before = len(batcher.stats.remote().result()["batch_models"])
    before_model = len(model.stats.remote().result()["batch_models"])
    bodies = [{**BODY, "seed": i, "model": ("tiny-b" if i % 2 else "sdxl-turbo")}
              for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(two_models, b), bodies))
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["meta"]["input"]["modelId"] for r in responses] == [
        b["model"] for b in bodies]
    batches = batcher.stats.remote().result()["batch_models"][before:]
    # Each batch's calls were of one model (the batcher records the set per batch).
    assert [len(batch) for batch in batches] == [1] * len(batches)
    assert {m for batch in batches for m in batch} == {"sdxl-turbo", "tiny-b"}
    assert len(batches) < 8  # calls did batch, each batch with one model
    ran = model.stats.remote().result()["batch_models"][before_model:]
    assert sorted(set(ran)) == ["sdxl-turbo", "tiny-b"]


def loads(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_a_third_model_evicts_the_least_recently_used(deployed, tmp_path):
    """Two models per replica (Ray's count limit): the third evicts the one used longest
    ago, and a model used since stays."""
    from ray import serve

    log = tmp_path / "loads.log"
    args = fake_args(tmp_path, model={"generator_options": {"loads_log": str(log)}})
    args.update({"models": [{"id": "b", "source": "fake"}, {"id": "c", "source": "fake"}],
                 "replica": {"num_cpus": 1, "max_models_per_replica": 2}})
    url = deployed("evictcount", args)
    model = serve.get_deployment_handle("Text2ImageModel", app_name="evictcount")
    assert loads(log) == ["sdxl-turbo"]
    for name, expected_loads in [("b", ["sdxl-turbo", "b"]),
                                 ("sdxl-turbo", ["sdxl-turbo", "b"]),  # held: no load
                                 ("c", ["sdxl-turbo", "b", "c"]),  # evicts b (LRU)
                                 ("sdxl-turbo", ["sdxl-turbo", "b", "c"]),
                                 ("b", ["sdxl-turbo", "b", "c", "b"])]:  # evicts c
        response = post(url, {"prompt": "p", "step": 1, "model": name})
        assert response.status_code == 200, response.text
        assert loads(log) == expected_loads, name
    stats = model.stats.remote().result()
    assert stats["loads"] == {"sdxl-turbo": 1, "b": 2, "c": 1}
    assert stats["evictions"] == {"b": 1, "c": 1}
    assert sorted(stats["held"]) == ["b", "sdxl-turbo"]


def test_the_memory_budget_evicts_by_size(deployed, tmp_path):
    """Three models fit by count, not by memory: loading the big one evicts the least
    recently used models until it fits (serve_app/ray_compat.py reaches Ray's LRU)."""
    from ray import serve

    log = tmp_path / "loads.log"
    args = fake_args(tmp_path, model={"generator_options": {"loads_log": str(log)},
                                      "memory_gib": 1.0})
    args.update({"models": [{"id": "b", "source": "fake", "memory_gib": 1.0},
                            {"id": "big", "source": "fake", "memory_gib": 2.0}],
                 "replica": {"num_cpus": 1, "models_memory_gib": 2.5}})
    url = deployed("evictmem", args)
    model = serve.get_deployment_handle("Text2ImageModel", app_name="evictmem")
    assert post(url, {"prompt": "p", "step": 1, "model": "b"}).status_code == 200
    assert sorted(model.stats.remote().result()["held"]) == ["b", "sdxl-turbo"]
    assert post(url, {"prompt": "p", "step": 1, "model": "big"}).status_code == 200
    stats = model.stats.remote().result()
    assert (stats["held"], stats["held_gib"]) == (["big"], 2.0)
    assert stats["evictions"] == {"sdxl-turbo": 1, "b": 1}
    assert post(url, {"prompt": "p", "step": 1}).status_code == 200  # evicts big
    stats = model.stats.remote().result()
    assert (stats["held"], stats["evictions"]["big"]) == (["sdxl-turbo"], 1)
    assert loads(log) == ["sdxl-turbo", "b", "big", "sdxl-turbo"]


def test_calls_for_a_model_go_to_the_replica_that_holds_it(deployed, tmp_path):
    """Two model replicas, one model each: once a replica holds tiny-b, calls for it go
    there and calls for the default to the other (no further loads); a router that ignored
    which replica holds which model would load them again and again."""
    log = tmp_path / "loads.log"
    args = fake_args(tmp_path, model={"generator_options": {"loads_log": str(log)}})
    args.update({"models": [{"id": "b", "source": "fake"}],
                 "replica": {"num_cpus": 1, "num_replicas": 2, "max_models_per_replica": 1}})
    url = deployed("routing", args)
    assert loads(log) == ["sdxl-turbo", "sdxl-turbo"]  # each replica loads the default
    assert post(url, {"prompt": "p", "step": 1, "model": "b"}).status_code == 200
    assert sorted(loads(log)) == ["b", "sdxl-turbo", "sdxl-turbo"]
    time.sleep(1.0)  # the replica reports what it holds to the routers (every 0.1 s)
    for i in range(12):
        name = "b" if i % 2 else "sdxl-turbo"
        response = post(url, {"prompt": "p", "step": 1, "model": name})
        assert response.status_code == 200, response.text
    assert sorted(loads(log)) == ["b", "sdxl-turbo", "sdxl-turbo"]
