"""Async jobs as a plain service: submission (idempotency keys), status, running,
heartbeats, takeover of stale jobs, callbacks.

No HTTP and no Ray: the ingress's routes call it, and tests drive it with a fake
generation function and an in-memory store. Records and callbacks themselves are in
serve_app.jobs.records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, NotFound, Overloaded, ServiceError, error_body
from serve_app.ingress.parsing import steps_per_call
from serve_app.jobs.records import (
    JobRecord,
    JobRequest,
    Progress,
    callback_host_allowed,
    dump,
    is_stale,
    key_name,
    load,
    lost_record,
    post_callback,
    record_name,
    request_model,
    step_record_name,
)

logger = logging.getLogger("ray.serve")


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


# The generation behind a job: (body, request_id, seed, base_url, on_call_done, *,
# progress_key, priority) -> the response body /api/text2image would have returned.
GenerateFn = Callable[..., Awaitable[dict[str, Any]]]


class JobService:
    def __init__(self, store: Any, config: AppConfig, generate: GenerateFn) -> None:
        self.store = store
        self.config = config
        self._generate = generate
        self._running_jobs: dict[str, asyncio.Task] = {}
        self._idempotency_locks = KeyedLocks()

    async def submit(self, body: JobRequest, idempotency_key: str | None,
                     base_url: str) -> tuple[JobRecord, bool]:
        """The job's record, and whether it was created now (False: an earlier submission
        with the same idempotency key made it)."""
        if body.callbackUrl is not None and not callback_host_allowed(
                body.callbackUrl.host, self.config.jobs.callback_hosts):
            raise InvalidRequest("callbackUrl names a host this service may not call "
                                 "(jobs.callback_hosts)", field="callbackUrl")
        if not idempotency_key:
            return await self._create_job(body, None, base_url)
        # Concurrent retries with one key create one job: serialised here on this replica,
        # and across replicas by creating the key's record only if it is absent.
        async with self._idempotency_locks.hold(idempotency_key):
            existing = await self._job_for_key(idempotency_key)
            if existing is not None:
                return existing, False
            return await self._create_job(body, idempotency_key, base_url)

    async def status(self, job_id: str) -> JobRecord:
        record = await self._load_job(job_id)
        if record.status == "running":
            record.progress.stepsDone = await self._steps_done(record)
        return record

    def start_scanner(self) -> asyncio.Task:
        """Jobs whose ingress died (records gone stale) are picked up by a live one."""
        return asyncio.get_running_loop().create_task(self._scan_jobs_forever())

    async def _create_job(self, body: JobRequest, idempotency_key: str | None,
                          base: str) -> tuple[JobRecord, bool]:
        job_id = uuid.uuid4().hex
        now = time.time()
        record = JobRecord(
            id=job_id, createdAt=now, updatedAt=now,
            # JSON mode: an image-to-image input image is stored as base64.
            request=body.model_dump(exclude={"callbackUrl"}, mode="json"),
            seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
            progress=Progress(total=body.number * body.batch,
                              stepsTotal=body.number * steps_per_call(body)),
            callbackUrl=str(body.callbackUrl) if body.callbackUrl else None,
            statusUrl=f"{base}/api/jobs/{job_id}",
        )
        await self._save_job(record)
        if idempotency_key and not await asyncio.to_thread(
                self.store.create_record, key_name(idempotency_key), job_id.encode()):
            # Another ingress replica claimed the key first; its job record was saved
            # before its claim, so it can be read now, and ours never runs.
            existing = await self._job_for_key(idempotency_key)
            if existing is not None:
                await asyncio.to_thread(self.store.delete_record, record_name(job_id))
                return existing, False
            # The key names a job that is gone (expired): this one takes the key over.
            await asyncio.to_thread(self.store.put_record, key_name(idempotency_key),
                                    job_id.encode())
        self._start_job(record, base)
        return record, True

    async def _reset_steps(self, record: JobRecord, calls: int) -> None:
        """A re-run starts its step counts from zero, not from the failed run's."""
        await asyncio.gather(*(
            asyncio.to_thread(self.store.put_record, step_record_name(record.id, i), b"0")
            for i in range(calls)))

    async def _steps_done(self, record: JobRecord) -> int:
        """Steps the model replicas have reported for a running job (read, not stored)."""
        calls = record.request.get("number", 1)

        def read(i: int) -> int:
            try:
                return int(self.store.get_record(step_record_name(record.id, i)))
            except (NotFound, ValueError):
                return 0
        done = await asyncio.gather(*(asyncio.to_thread(read, i) for i in range(calls)))
        return min(sum(done), record.progress.stepsTotal)

    async def _load_job(self, job_id: str) -> JobRecord:
        try:
            data = await asyncio.to_thread(self.store.get_record, record_name(job_id))
        except NotFound:
            raise NotFound("job not found") from None
        try:
            return load(data)
        except ValidationError:
            # Records are replaced whole, so this is damage from outside (a writer on a
            # store without atomic replace, killed mid-write): the request is unreadable
            # and cannot run again. Say so, rather than 500 on every poll forever.
            logger.warning("job %s: record unreadable (%d bytes); reported as failed", job_id,
                           len(data))
            return lost_record(job_id)

    async def _save_job(self, record: JobRecord) -> None:
        record.updatedAt = time.time()
        await asyncio.to_thread(self.store.put_record, record_name(record.id), dump(record))

    async def _job_for_key(self, idempotency_key: str) -> JobRecord | None:
        try:
            job_id = await asyncio.to_thread(self.store.get_record, key_name(idempotency_key))
            return await self._load_job(job_id.decode())
        except NotFound:
            return None

    def _start_job(self, record: JobRecord, base_url: str) -> None:
        if record.id in self._running_jobs:
            return
        task = asyncio.get_running_loop().create_task(self._run_job(record, base_url))
        self._running_jobs[record.id] = task
        task.add_done_callback(lambda _: self._running_jobs.pop(record.id, None))

    async def _run_job(self, record: JobRecord, base_url: str) -> None:
        cfg = self.config.jobs
        body = request_model(record.request).model_validate(record.request)

        def progress(images: int) -> None:
            record.progress.done += images

        async def heartbeat(stop: asyncio.Event) -> None:
            # Stopped by an event, never cancelled: a cancelled task would leave its write
            # running in a thread, and that stale "running" record could land after the
            # final one and get the finished job taken over and run again.
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), cfg.heartbeat_s)
                except asyncio.TimeoutError:
                    await self._save_job(record)

        while record.status in ("queued", "running"):
            record.status, record.attempts = "running", record.attempts + 1
            record.progress.done = record.progress.stepsDone = 0
            await self._save_job(record)
            await self._reset_steps(record, body.number)
            stop_beat = asyncio.Event()
            beat = asyncio.get_running_loop().create_task(heartbeat(stop_beat))
            try:
                # Job calls wait behind interactive ones in the batching deployment.
                record.result = await self._generate(body, record.id, record.seed, base_url,
                                                     progress, progress_key=record.id,
                                                     priority="job")
                record.status = "succeeded"
                record.progress.stepsDone = record.progress.stepsTotal
            except Overloaded as err:
                # A job waits for capacity instead of failing; this run doesn't count.
                record.status, record.attempts = "queued", record.attempts - 1
                await asyncio.sleep(err.retry_after_s)
            except ServiceError as err:
                if record.attempts >= cfg.max_attempts or isinstance(err, InvalidRequest):
                    record.status, record.error = "failed", error_body(err)["error"]
                else:
                    record.status = "queued"
                    logger.warning("job %s: run %d failed (%s), running it again", record.id,
                                   record.attempts, err.code)
            except Exception:
                logger.exception("job %s: unexpected error", record.id)
                record.status = "failed"
                record.error = {"code": "internal_error", "message": "internal error",
                                "requestId": record.id}
            finally:
                stop_beat.set()
                await beat
            await self._save_job(record)
        logger.info("job %s %s after %d run(s)", record.id, record.status, record.attempts)
        if record.callbackUrl:
            record.callbackDelivered = await asyncio.to_thread(
                post_callback, record.callbackUrl, record.public(), cfg.callback_attempts,
                cfg.callback_backoff_s)
            await self._save_job(record)

    async def _scan_jobs_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.jobs.scan_interval_s)
            try:
                await self._resume_stale_jobs()
            except Exception:
                logger.exception("job scan failed; retrying next interval")

    async def _resume_stale_jobs(self) -> int:
        resumed = 0
        names = await asyncio.to_thread(self.store.list_records, "job-")
        for name in names:
            job_id = name.removeprefix("job-")
            if job_id in self._running_jobs:
                continue
            try:
                record = await self._load_job(job_id)
            except (NotFound, ValidationError):
                continue
            if is_stale(record, self.config.jobs.lease_s):
                logger.info("job %s: its ingress stopped refreshing it; resuming", job_id)
                base = (record.statusUrl or "").rsplit("/api/jobs/", 1)[0]
                self._start_job(record, base)
                resumed += 1
        return resumed

