"""JobRunner, one delivery of a job on the consumer: outcomes, attempts, redeliveries.

Rewritten with issue 12: the heartbeat and stale-job takeover it tested are gone (the
broker redelivers a job whose consumer died); what a delivery does is tested instead."""

import asyncio
import uuid

import pytest

from serve_app.config import AppConfig
from serve_app.errors import GenerationFailed, Overloaded, ReplicaLost
from serve_app.jobs.records import JobRecord, Progress, dump, load
from serve_app.jobs.service import JobFailed, JobRetry, JobRunner
from serve_app.store import ImageStore
from serve_app.store import job_record_name as record_name


class ScriptedGenerate:
    """The generation service as the runner calls it; `script` says what successive runs
    do: "ok", "fail" (a generation error), "overloaded" or "lost" (replicas lost)."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.runs: list[tuple[str, str]] = []

    async def __call__(self, body, request_id, seed, base_url, on_call_done=None,
                       progress_key=None, priority="interactive"):
        self.runs.append((progress_key, priority))
        action = self.script.pop(0) if self.script else "ok"
        if action == "fail":
            raise GenerationFailed("image generation failed", request_id=request_id)
        if action == "overloaded":
            raise Overloaded("full", retry_after_s=0)
        if action == "lost":
            raise ReplicaLost("lost", retry_after_s=0)
        if action == "lost_retry_in_200s":
            raise ReplicaLost("lost", retry_after_s=200)
        on_call_done(1)
        return {"id": request_id, "output": [{"url": "u"}]}


def setup(script, **jobs):
    store = ImageStore(f"memory://{uuid.uuid4().hex}/sd")
    generate = ScriptedGenerate(script)
    config = AppConfig.model_validate({"jobs": {"max_attempts": 3, **jobs}})
    runner = JobRunner(store, config, generate)
    job_id = uuid.uuid4().hex
    record = JobRecord(id=job_id, createdAt=1.0, updatedAt=1.0,
                       request={"prompt": "p", "number": 1, "size": "512x512", "step": 2,
                                "batch": 1, "seed": 1},
                       seed=1, progress=Progress(total=1, stepsTotal=2))
    store.put_record(record_name(job_id), dump(record))
    return runner, store, generate, job_id


def stored(store, job_id) -> JobRecord:
    return load(store.get_record(record_name(job_id)))


def test_a_delivery_runs_the_job_at_job_priority_and_records_success():
    runner, store, generate, job_id = setup(["ok"])
    assert asyncio.run(runner.run(job_id, "http://h")) == "succeeded"
    record = stored(store, job_id)
    assert (record.status, record.attempts, record.error) == ("succeeded", 1, None)
    assert record.progress.model_dump() == {"done": 1, "total": 1, "stepsDone": 2,
                                            "stepsTotal": 2}
    assert record.result == {"id": job_id, "output": [{"url": "u"}]}
    assert generate.runs == [(job_id, "job")]


def test_a_second_delivery_of_a_finished_job_runs_nothing():
    runner, store, generate, job_id = setup(["ok"])
    asyncio.run(runner.run(job_id, "http://h"))
    assert asyncio.run(runner.run(job_id, "http://h")) == "finished_before"
    assert len(generate.runs) == 1
    assert stored(store, job_id).attempts == 1


def test_failed_runs_are_retried_by_the_broker_then_end_failed():
    runner, store, generate, job_id = setup(["fail", "fail", "fail"])
    for attempt in (1, 2):
        with pytest.raises(JobRetry):
            asyncio.run(runner.run(job_id, "http://h"))
        record = stored(store, job_id)
        assert (record.status, record.attempts, record.error["code"]) == (
            "queued", attempt, "generation_failed")
    with pytest.raises(JobFailed):  # final: the message goes to the dead-letter queue
        asyncio.run(runner.run(job_id, "http://h"))
    record = stored(store, job_id)
    assert (record.status, record.attempts, record.error["code"]) == (
        "failed", 3, "generation_failed")
    # A failed job delivered again stays failed, and runs nothing.
    with pytest.raises(JobFailed):
        asyncio.run(runner.run(job_id, "http://h"))
    assert len(generate.runs) == 3


def test_runs_lost_with_their_consumer_count_as_attempts():
    """A consumer killed mid-run records no outcome: its record says running, attempts 3.
    The next delivery ends the job instead of running it a fourth time."""
    runner, store, generate, job_id = setup(["ok"])
    record = stored(store, job_id)
    record.status, record.attempts = "running", 3
    store.put_record(record_name(job_id), dump(record))
    with pytest.raises(JobFailed):
        asyncio.run(runner.run(job_id, "http://h"))
    record = stored(store, job_id)
    assert (record.status, record.error["code"]) == ("failed", "attempts_exhausted")
    assert generate.runs == []


def test_a_full_batching_queue_makes_the_job_wait_without_spending_an_attempt():
    runner, store, generate, job_id = setup(["overloaded", "overloaded", "ok"])
    assert asyncio.run(runner.run(job_id, "http://h")) == "succeeded"
    assert (stored(store, job_id).attempts, len(generate.runs)) == (1, 3)


def test_replicas_lost_with_their_node_make_the_job_wait_without_spending_an_attempt():
    # More losses in a row than the job has attempts: a node away for a while loses none.
    runner, store, generate, job_id = setup(["lost"] * 4 + ["ok"])
    assert asyncio.run(runner.run(job_id, "http://h")) == "succeeded"
    assert (stored(store, job_id).attempts, len(generate.runs)) == (1, 5)


def test_a_wait_past_the_deliverys_deadline_is_delivered_again_with_no_attempt_spent():
    # Retry-After 200 s: past the delivery's deadline (half the 310 s visibility timeout).
    runner, store, generate, job_id = setup(["lost_retry_in_200s", "ok"], broker={
        "visibility_timeout_s": 310.0})
    with pytest.raises(JobRetry):
        asyncio.run(runner.run(job_id, "http://h"))
    record = stored(store, job_id)
    assert (record.status, record.attempts, record.error) == ("queued", 0, None)
    assert asyncio.run(runner.run(job_id, "http://h")) == "succeeded"
    assert (stored(store, job_id).attempts, len(generate.runs)) == (1, 2)


def test_a_delivery_whose_record_expired_is_dropped():
    runner, store, generate, _ = setup(["ok"])
    assert asyncio.run(runner.run(uuid.uuid4().hex, "http://h")) == "missing"
    assert generate.runs == []


def test_a_damaged_record_reads_as_a_failed_job_and_is_never_run(tmp_path):
    """An empty or truncated record (left by a writer killed mid-write on a store without
    atomic replace) answers as a failed job with a clear error, and a delivery of it runs
    nothing."""
    runner, _, generate, _ = setup(["ok"])
    store = ImageStore(str(tmp_path))
    runner.records.store = store
    for job_id, data in (("b" * 32, b""), ("c" * 32, b'{"id": "ccc", "status": "runn')):
        store.put_record(record_name(job_id), data)
        record = asyncio.run(runner.records.load(job_id))
        assert (record.id, record.status, record.error["code"]) == (job_id, "failed",
                                                                     "job_lost")
        assert record.error["message"] == ("the job's record was damaged and it cannot run "
                                           "again; submit it again")
        with pytest.raises(JobFailed):
            asyncio.run(runner.run(job_id, "http://h"))
    assert generate.runs == []
