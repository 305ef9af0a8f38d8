"""The job runner's record writes, with a store whose writes are slow and out of order."""

import asyncio
import json
import threading
import time

from serve_app.config import AppConfig
from serve_app.jobs.records import JobRecord, Progress, record_name
from serve_app.jobs.service import JobService


class SlowStore:
    """Writes of a 'running' record take long; others are quick: a late heartbeat write
    would land after the final one if the runner did not wait for it."""

    def __init__(self):
        self.records: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def put_record(self, name, data):
        if name.startswith("job-") and json.loads(data)["status"] == "running":
            time.sleep(0.3)
        with self.lock:
            self.records[name] = data

    def get_record(self, name):
        return self.records[name]


async def slow_generate(body, request_id, seed, base_url, on_call_done=None,
                        progress_key=None, priority="interactive"):
    # Job calls wait behind interactive ones in the batching deployment.
    assert (progress_key, priority) == (request_id, "job")
    await asyncio.sleep(0.5)  # a heartbeat write (0.40 s to 0.70 s) is in flight at the end
    on_call_done(1)
    return {"id": request_id, "output": []}


def Runner() -> JobService:  # noqa: N802 - reads as the class it makes
    return JobService(SlowStore(), AppConfig.model_validate(
        {"jobs": {"heartbeat_s": 0.05, "lease_s": 5.0}}), slow_generate)


def test_the_final_record_is_the_last_write():
    runner = Runner()
    now = time.time()
    record = JobRecord(id="a" * 32, createdAt=now, updatedAt=now,
                       request={"prompt": "p", "number": 1, "size": "512x512", "step": 1,
                                "batch": 1, "seed": 1},
                       seed=1, progress=Progress(total=1, stepsTotal=1))

    async def run():
        await runner._run_job(record, "http://test")
        await asyncio.sleep(0.6)  # any stray write still in a thread lands by now

    asyncio.run(run())
    stored = json.loads(runner.store.records[record_name("a" * 32)])
    assert (stored["status"], stored["attempts"]) == ("succeeded", 1)
    assert stored["progress"] == {"done": 1, "total": 1, "stepsDone": 1, "stepsTotal": 1}


def test_keyed_locks_serialise_one_key_and_forget_it_afterwards():
    from serve_app.jobs.service import KeyedLocks

    locks = KeyedLocks()
    events: list[str] = []

    async def worker(key: str, name: str) -> None:
        async with locks.hold(key):
            events.append(f"{name} in")
            await asyncio.sleep(0.01)
            events.append(f"{name} out")

    async def main() -> int:
        await asyncio.gather(worker("k", "a"), worker("k", "b"), worker("other", "c"))
        return len(locks)

    assert asyncio.run(main()) == 0  # no lock left behind
    # a and b never overlap; c (another key) runs beside a.
    assert events == ["a in", "c in", "a out", "c out", "b in", "b out"]


def test_a_damaged_record_reads_as_a_failed_job_and_is_never_resumed(tmp_path):
    """An empty or truncated record (left by a writer killed mid-write on a store without
    atomic replace) answers as a failed job with a clear error, not a 500 on every poll,
    and the stale-job scan skips it instead of running a request it cannot read."""
    from serve_app.store import ImageStore

    runner = Runner()
    runner.store = ImageStore(str(tmp_path))
    for job_id, data in (("b" * 32, b""), ("c" * 32, b'{"id": "ccc", "status": "runn')):
        runner.store.put_record(record_name(job_id), data)
        record = asyncio.run(runner._load_job(job_id))
        assert (record.id, record.status, record.error["code"]) == (job_id, "failed",
                                                                     "job_lost")
        assert record.error["message"] == ("the job's record was damaged and it cannot run "
                                           "again; submit it again")
    assert asyncio.run(runner._resume_stale_jobs()) == 0
    assert runner._running_jobs == {}
