"""Generation and jobs as plain services, without Ray: a fake batcher handle and an
in-memory store (fsspec's memory filesystem) stand in for the deployments and the bucket."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
from ray.exceptions import RayActorError

from serve_app.config import AppConfig
from serve_app.errors import GenerationFailed, GenerationTimeout, Overloaded, ReplicaLost
from serve_app.generation.schemas import Text2ImageRequest
from serve_app.generation.service import GenerationService
from serve_app.jobs.records import JobRequest
from serve_app.jobs.service import JobService
from serve_app.protocol import GenerationItem, ModelResult
from serve_app.store import ImageStore


class FakeBatcher:
    """What a Serve handle to the Batcher offers: `generate.remote(call)`, awaitable.
    `script` lists what successive calls do: "ok", "overloaded", "error", "lost" (the
    batcher replica died) or "model_lost" (the batcher gave up on lost model replicas)."""

    def __init__(self, script: list[str] | None = None, delay_s: float = 0.0) -> None:
        self.script = list(script or [])
        self.delay_s = delay_s
        self.calls: list[GenerationItem] = []
        self.cancelled = 0
        self.generate = self

    def remote(self, call: GenerationItem):
        self.calls.append(call)
        action = self.script.pop(0) if self.script else "ok"
        return self._answer(call, action)

    async def _answer(self, call: GenerationItem, action: str) -> ModelResult:
        if action == "overloaded":  # the batcher's queue is full: it answers at once
            return ModelResult(error="overloaded")
        if action == "model_lost":
            return ModelResult(error="replica_lost")
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if action == "lost":
            raise RayActorError()
        if action == "error":
            return ModelResult(error="Boom")
        pixels = np.full((call.height, call.width, 3), call.call_index, np.uint8)
        return ModelResult(images=[pixels] * call.count, pipeline_s=0.01,
                           batch_size=1)


def service(batcher: FakeBatcher, **config) -> GenerationService:
    store = ImageStore(f"memory://{uuid.uuid4().hex}/sd")
    return GenerationService(batcher, store, AppConfig.model_validate(config))


def request(**fields) -> Text2ImageRequest:
    return Text2ImageRequest.model_validate({"prompt": "p", "size": "512x512", **fields})


def test_a_request_becomes_calls_pngs_in_the_store_and_the_response_body():
    batcher = FakeBatcher()
    gen = service(batcher)
    timings: dict[str, float] = {}
    body = asyncio.run(gen.generate(request(number=2, batch=2, step=1), "a" * 32, 7,
                                    "http://host", timings=timings))
    assert [(c.call_index, c.count, c.seed, c.priority) for c in batcher.calls] == [
        (0, 2, 7, "interactive"), (1, 2, 7, "interactive")]
    assert [o["url"] for o in body["output"]] == [
        f"http://host/images/{'a' * 32}/{n}.png" for n in ("0_0", "0_1", "1_0", "1_1")]
    assert body["gridUrl"] == f"http://host/images/{'a' * 32}/image_grid.png"
    assert body["meta"]["input"]["seed"] == 7 and body["status"] == "success"
    assert gen.store.get("a" * 32, "1_1.png").startswith(b"\x89PNG")
    assert gen.store.get("a" * 32, "image_grid.png").startswith(b"\x89PNG")
    assert set(timings) == {"pipeline", "model", "store"} and timings["pipeline"] == 0.01


def test_a_call_lost_with_a_batcher_replica_is_sent_again():
    batcher = FakeBatcher(["lost", "ok"])
    body = asyncio.run(service(batcher).generate(request(), "b" * 32, 1, "http://h"))
    assert len(body["output"]) == 1
    assert len(batcher.calls) == 2


def test_a_full_queue_is_503_and_the_other_calls_give_their_places_back():
    batcher = FakeBatcher(["overloaded", "ok", "ok"], delay_s=0.05)
    gen = service(batcher, ingress={"retry_after_s": 9})
    with pytest.raises(Overloaded) as info:
        asyncio.run(gen.generate(request(number=3), "c" * 32, 1, "http://h"))
    assert (info.value.status_code, info.value.headers()) == (503, {"Retry-After": "9"})
    assert batcher.cancelled == 2


def test_a_batcher_replica_lost_on_every_try_is_503_with_retry_after():
    batcher = FakeBatcher(["lost", "lost", "lost", "ok"])
    gen = service(batcher, ingress={"retry_after_s": 4})
    with pytest.raises(ReplicaLost) as info:
        asyncio.run(gen.generate(request(), "e" * 32, 1, "http://h"))
    assert (info.value.status_code, info.value.code, info.value.headers()) == (
        503, "replica_lost", {"Retry-After": "4"})
    assert len(batcher.calls) == 3  # the first try and REPLICA_LOST_RETRIES more


def test_model_replicas_lost_on_every_try_are_503_with_retry_after_not_a_500():
    gen = service(FakeBatcher(["model_lost"]), ingress={"retry_after_s": 6})
    with pytest.raises(ReplicaLost) as info:
        asyncio.run(gen.generate(request(), "f" * 32, 1, "http://h"))
    assert (info.value.status_code, info.value.headers(), info.value.request_id) == (
        503, {"Retry-After": "6"}, "f" * 32)


def test_a_call_past_the_request_timeout_is_504_with_retry_after():
    gen = service(FakeBatcher(delay_s=5.0), ingress={"request_timeout_s": 0.05,
                                                     "retry_after_s": 3})
    with pytest.raises(GenerationTimeout) as info:
        asyncio.run(gen.generate(request(), "g" * 32, 1, "http://h"))
    assert (info.value.status_code, info.value.code, info.value.headers()) == (
        504, "timeout", {"Retry-After": "3"})


def test_a_pipeline_error_is_a_500_with_the_request_id():
    with pytest.raises(GenerationFailed) as info:
        asyncio.run(service(FakeBatcher(["error"])).generate(request(), "d" * 32, 1, "h"))
    assert (info.value.status_code, info.value.request_id) == (500, "d" * 32)


class ListQueue:
    """The broker as the ingress sees it: enqueue, or fail as an unreachable one does."""

    def __init__(self, fail: bool = False) -> None:
        self.jobs: list[tuple[str, str]] = []
        self.fail = fail

    def enqueue(self, job_id: str, base_url: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.jobs.append((job_id, base_url))


class DictKeys:
    """Idempotency keys with Redis SET NX's contract (atomic: no await between the check
    and the set)."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}

    async def claim(self, key: str, job_id: str) -> str | None:
        await asyncio.sleep(0)  # let concurrent submissions interleave up to here
        owner = self.keys.setdefault(key, job_id)
        return None if owner == job_id else owner

    async def release(self, key: str, job_id: str) -> None:
        if self.keys.get(key) == job_id:
            del self.keys[key]


def test_concurrent_submissions_with_one_key_make_one_job_that_runs_as_job_priority():
    """Changed with issue 12: the job is queued on the broker and run by JobRunner (the
    consumer), no longer started by the submitting ingress."""
    from serve_app.jobs.service import JobRunner

    batcher = FakeBatcher(delay_s=0.05)
    gen = service(batcher)
    queue, keys = ListQueue(), DictKeys()
    jobs = JobService(gen.store, gen.config, queue, keys)
    runner = JobRunner(gen.store, gen.config, gen.generate)
    body = JobRequest.model_validate({"prompt": "p", "number": 2, "step": 1})

    async def main():
        results = await asyncio.gather(*(jobs.submit(body, "order-1", "http://h")
                                         for _ in range(8)))
        ids = {record.id for record, _ in results}
        created = [created for _, created in results]
        (job_id,) = ids
        assert queue.jobs == [(job_id, "http://h")]
        assert (await jobs.status(job_id)).status == "queued"
        outcome = await runner.run(*queue.jobs[0])
        return created, outcome, await jobs.status(job_id)

    created, outcome, record = asyncio.run(main())
    assert created.count(True) == 1 and created.count(False) == 7
    assert outcome == "succeeded"
    assert (record.status, record.attempts) == ("succeeded", 1)
    assert record.progress.model_dump() == {"done": 2, "total": 2, "stepsDone": 2,
                                            "stepsTotal": 2}
    assert [c.priority for c in batcher.calls] == ["job", "job"]
    assert record.result is not None and len(record.result["output"]) == 2
    # Only the winning submission's record is left in the store.
    names = [p.rsplit("/", 1)[1] for p in gen.store.fs.ls(f"{gen.store.root}/jobs",
                                                          detail=False)]
    assert [n for n in names if n.startswith("job-")] == [f"job-{record.id}.json"]


def test_a_job_the_broker_cannot_take_is_503_and_leaves_nothing_behind():
    from serve_app.errors import JobsUnavailable

    gen = service(FakeBatcher(), ingress={"retry_after_s": 7})
    keys = DictKeys()
    jobs = JobService(gen.store, gen.config, ListQueue(fail=True), keys)
    body = JobRequest.model_validate({"prompt": "p"})
    with pytest.raises(JobsUnavailable) as info:
        asyncio.run(jobs.submit(body, "order-2", "http://h"))
    assert (info.value.status_code, info.value.code, info.value.headers()) == (
        503, "jobs_unavailable", {"Retry-After": "7"})
    assert keys.keys == {}  # the key is free for the client's retry
    assert gen.store.fs.find(gen.store.root) == []


def test_a_key_store_that_cannot_be_reached_is_503_too():
    from serve_app.errors import JobsUnavailable

    class DownKeys(DictKeys):
        async def claim(self, key: str, job_id: str) -> str | None:
            raise ConnectionError("redis down")

    gen = service(FakeBatcher())
    queue = ListQueue()
    jobs = JobService(gen.store, gen.config, queue, DownKeys())
    with pytest.raises(JobsUnavailable):
        asyncio.run(jobs.submit(JobRequest.model_validate({"prompt": "p"}), "k", "http://h"))
    assert queue.jobs == []
    assert gen.store.fs.find(gen.store.root) == []
