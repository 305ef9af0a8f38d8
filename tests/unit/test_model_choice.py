"""Choosing a model per request (issue 23), without Ray: the request field and its errors,
the calls and the response naming the model, jobs carrying it, and the batching deployment
sending each model's batches with that model's multiplexed id, never mixing models.

A fake batcher handle and an in-memory store stand in for the deployments
(tests/unit/test_services.py); the Batcher class itself runs over a fake model handle."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve_app.batching.deployment import Batcher
from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, ModelUnavailable, UnknownModel
from serve_app.generation.models import ModelCatalog, catalog_of
from serve_app.generation.requests import validate_request
from serve_app.generation.schemas import Text2ImageRequest
from serve_app.ingress.deployment import build_http_app
from serve_app.ingress.openai_api import OpenAIImagesService
from serve_app.ingress.services import IngressServices
from serve_app.jobs.records import JobRecord, JobRequest, Progress, dump, load
from serve_app.jobs.service import JobRunner, JobService
from serve_app.protocol import GenerationItem, ModelBatch, ModelResult
from serve_app.store import job_record_name
from tests.unit.test_services import DictKeys, FakeBatcher, ListQueue, request, service

TWO = {"models": [{"id": "tiny-b", "source": "embedded:tiny-sdxl-b"}]}
IDS = "['sdxl-turbo', 'tiny-b']"


def test_the_catalog_resolves_ids_aliases_and_sources():
    catalog = ModelCatalog(AppConfig.model_validate(
        {**TWO, "model": {"id": "turbo"},
         "models": [*TWO["models"], {"id": "same-src", "source": "embedded:tiny-sdxl-b"}]}))
    assert catalog.ids == ["turbo", "tiny-b", "same-src"]
    assert catalog.resolve(None) == "turbo"
    assert catalog.resolve("tiny-b") == "tiny-b"
    assert catalog.resolve("sdxl-turbo") == "turbo"  # the name before models had ids
    assert catalog.resolve("embedded:tiny-sdxl") == "turbo"  # a source only it has
    with pytest.raises(UnknownModel):
        catalog.resolve("embedded:tiny-sdxl-b")  # two models share it: ambiguous
    with pytest.raises(UnknownModel) as caught:
        catalog.resolve("x" * 150)
    assert caught.value.message == (f"model '{'x' * 64}...' is not served here; valid ids: "
                                    "['turbo', 'tiny-b', 'same-src']")
    config = AppConfig.model_validate(TWO)
    assert catalog_of(config) is catalog_of(config)


def test_the_listing_says_what_is_served_and_never_a_path():
    config = AppConfig.model_validate({"models": [
        {"id": "dir", "source": "/secret/place/model",
         "loras": [{"source": "/secret/lora.safetensors"}]}]})
    listing = catalog_of(config).listing(loaded={"dir": {"backend": "torch",
                                                         "dtype": "float32"}})
    assert listing == [
        {"id": "sdxl-turbo", "default": True, "source": "embedded", "loras": 0,
         "loaded": False},
        {"id": "dir", "default": False, "source": "directory", "loras": 1, "loaded": True,
         "backend": "torch", "dtype": "float32"}]
    assert "secret" not in repr(catalog_of(config).listing())


def test_a_request_names_its_model_and_the_calls_and_response_carry_it():
    batcher = FakeBatcher()
    gen = service(batcher, **TWO)
    body = asyncio.run(gen.generate(request(model="tiny-b", number=2), "a" * 32, 7, "http://h"))
    assert [c.model for c in batcher.calls] == ["tiny-b", "tiny-b"]
    assert (body["meta"]["input"]["modelId"], body["meta"]["input"]["model"]) == (
        "tiny-b", "embedded:tiny-sdxl-b")
    default = asyncio.run(gen.generate(request(), "b" * 32, 7, "http://h"))
    assert batcher.calls[-1].model == "sdxl-turbo"
    assert (default["meta"]["input"]["modelId"], default["meta"]["input"]["model"]) == (
        "sdxl-turbo", "embedded:tiny-sdxl")


def test_an_unknown_model_is_refused_naming_the_valid_ids():
    config = AppConfig.model_validate(TWO)
    with pytest.raises(UnknownModel) as caught:
        validate_request({"prompt": "p", "model": "dall-e-2"}, config, Text2ImageRequest)
    assert (caught.value.status_code, caught.value.code, caught.value.field) == (
        422, "unknown_model", "model")
    assert caught.value.message == f"model 'dall-e-2' is not served here; valid ids: {IDS}"
    assert isinstance(caught.value, InvalidRequest)
    assert validate_request({"prompt": "p", "model": "tiny-b"}, config,
                            Text2ImageRequest).model == "tiny-b"


def test_a_model_that_does_not_load_is_a_500_naming_it():
    class Unloadable(FakeBatcher):
        async def _answer(self, call, action):
            return ModelResult(error="model_unavailable",
                               message=f"model {call.model!r} could not be loaded")

    gen = service(Unloadable(), **TWO)
    with pytest.raises(ModelUnavailable) as caught:
        asyncio.run(gen.generate(request(model="tiny-b"), "c" * 32, 1, "http://h"))
    assert (caught.value.status_code, caught.value.message) == (
        500, "model 'tiny-b' could not be loaded")


def http_client(batcher: FakeBatcher) -> TestClient:
    generation = service(batcher, **TWO)
    services = IngressServices(
        config=generation.config, api_keys=None, store=generation.store,
        generation=generation, jobs=None,  # type: ignore[arg-type]
        openai=OpenAIImagesService(generation, generation.store, generation.config),
        readiness=None)  # type: ignore[arg-type]
    return TestClient(build_http_app(services))


def test_over_http_unknown_is_422_natively_and_400_on_v1_with_the_ids():
    batcher = FakeBatcher()
    client = http_client(batcher)
    native = client.post("/api/text2image", json={"prompt": "p", "model": "nope"})
    assert native.status_code == 422
    assert native.json()["error"] == {
        "code": "unknown_model", "field": "model",
        "message": f"model 'nope' is not served here; valid ids: {IDS}"}
    openai = client.post("/v1/images/generations", json={"prompt": "p", "model": "dall-e-3"})
    assert openai.status_code == 400
    assert openai.json()["error"] == {
        "message": f"model 'dall-e-3' is not served here; valid ids: {IDS}",
        "type": "invalid_request_error", "param": "model", "code": "unknown_model"}
    assert batcher.calls == []
    ok = client.post("/v1/images/generations", json={"prompt": "p", "model": "tiny-b"})
    assert ok.status_code == 200 and [c.model for c in batcher.calls] == ["tiny-b"]
    listed = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["default"]) for m in listed] == [("sdxl-turbo", True),
                                                        ("tiny-b", False)]
    assert client.get("/v1/models/tiny-b").json()["id"] == "tiny-b"
    missing = client.get("/v1/models/dall-e-2")
    assert (missing.status_code, missing.json()["error"]["param"]) == (404, "model")


def test_a_job_carries_its_model_and_an_old_job_without_one_runs_the_default():
    batcher = FakeBatcher()
    gen = service(batcher, **TWO)
    jobs = JobService(gen.store, gen.config, ListQueue(), DictKeys())
    body = validate_request({"prompt": "p", "model": "tiny-b", "step": 1}, gen.config,
                            JobRequest)
    record, created = asyncio.run(jobs.submit(body, None, "http://h"))
    assert created and record.request["model"] == "tiny-b"
    runner = JobRunner(gen.store, gen.config, gen.generate)
    assert asyncio.run(runner.run(record.id, "http://h")) == "succeeded"
    done = load(gen.store.get_record(job_record_name(record.id)))
    assert done.result is not None
    assert done.result["meta"]["input"]["modelId"] == "tiny-b"
    assert [(c.model, c.priority) for c in batcher.calls] == [("tiny-b", "job")]
    # Queued before models existed: its stored request has no "model".
    old_id = uuid.uuid4().hex
    old = JobRecord(id=old_id, createdAt=1.0, updatedAt=1.0,
                    request={"prompt": "p", "number": 1, "size": "512x512", "step": 1,
                             "batch": 1, "seed": 1},
                    seed=1, progress=Progress(total=1, stepsTotal=1))
    gen.store.put_record(job_record_name(old_id), dump(old))
    assert asyncio.run(runner.run(old_id, "http://h")) == "succeeded"
    assert batcher.calls[-1].model == "sdxl-turbo"
    with pytest.raises(UnknownModel):
        validate_request({"prompt": "p", "model": "gone"}, gen.config, JobRequest)


class FakeModelHandle:
    """A model deployment's handle as the Batcher uses it: `options(multiplexed_model_id)`,
    `run_batch.remote(batch)` giving an awaitable response that is assigned at once, and
    the router path ray_compat reads (one replica). Each batch takes `delay_s`; its images
    are filled with a value per model, so a call gets its own model's pixels."""

    VALUES = {"sdxl-turbo": 10, "tiny-b": 20}

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.batches: list[tuple[str | None, list[str | None]]] = []
        self._router = SimpleNamespace(_asyncio_router=SimpleNamespace(
            request_router=SimpleNamespace(curr_replicas=["one"])))
        self._model_id: str | None = None

    def options(self, multiplexed_model_id: str) -> FakeModelHandle:
        bound = FakeModelHandle(self.delay_s)
        bound.batches, bound._router = self.batches, self._router
        bound._model_id = multiplexed_model_id
        return bound

    @property
    def run_batch(self) -> FakeModelHandle:
        return self

    def remote(self, batch: ModelBatch) -> _Response:
        self.batches.append((self._model_id, [c.model for c in batch.calls]))
        return _Response(self._run(batch))

    async def _run(self, batch: ModelBatch) -> list[ModelResult]:
        await asyncio.sleep(self.delay_s)
        value = self.VALUES[self._model_id or ""]
        return [ModelResult(images=[np.full((2, 2, 3), value, np.uint8)], batch_size=len(
            batch.calls)) for _ in batch.calls]


class _Response:
    def __init__(self, coro) -> None:
        self._task = asyncio.ensure_future(coro)

    async def _fetch_future_result_async(self) -> None:
        return None

    def __await__(self):
        return self._task.__await__()


def test_the_batcher_never_mixes_models_and_alternates_between_them():
    config = AppConfig.model_validate({**TWO, "batching": {"max_batch_size": 2}})
    model = FakeModelHandle()

    async def run():
        batcher = Batcher.func_or_class(model, config.model_dump(mode="json"))
        calls = [GenerationItem(f"p{i}", 512, 512, 1, seed=i,
                                model=("tiny-b" if i % 3 else "sdxl-turbo"))
                 for i in range(12)]
        results = await asyncio.gather(*(batcher.generate(call) for call in calls))
        return calls, results, batcher.stats()

    calls, results, stats = asyncio.run(run())
    for call, result in zip(calls, results):
        assert result.error is None
        assert int(result.images[0][0, 0, 0]) == FakeModelHandle.VALUES[call.model or ""]
    # Every batch went with its calls' model as the multiplexed id, never two models.
    assert all(calls_models == [model_id] * len(calls_models)
               for model_id, calls_models in model.batches)
    assert sum(len(m) for _, m in model.batches) == 12
    assert [len(m) for _, m in model.batches] == [2] * 6  # batching did happen
    assert all(len(models) == 1 for models in stats["batch_models"])
    # While both wait, the models take turns (4 calls of the default, 8 of tiny-b).
    assert [model_id for model_id, _ in model.batches] == [
        "sdxl-turbo", "tiny-b", "sdxl-turbo", "tiny-b", "tiny-b", "tiny-b"]
