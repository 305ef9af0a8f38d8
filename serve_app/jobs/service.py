"""Async jobs as plain services: JobService submits (idempotency keys) and reports status
on the ingress; JobRunner runs one delivered job on the consumer.

No HTTP and no Ray: the ingress's routes and the consumer's task handler call them, and
tests drive them with fakes (a list for the queue, a dict for the keys, an in-memory
store). The broker (serve_app.jobs.broker) gives at-least-once delivery; the runner makes a
second delivery of a finished job harmless. Records and callbacks are in
serve_app.jobs.records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.errors import (
    InvalidRequest,
    JobsUnavailable,
    NotFound,
    Overloaded,
    ReplicaLost,
    ServiceError,
    error_body,
)
from serve_app.generation.requests import seed_of, steps_per_call
from serve_app.generation.schemas import Text2ImageRequest
from serve_app.jobs.records import (
    JobRecord,
    JobRequest,
    Progress,
    callback_host_allowed,
    dump,
    load,
    lost_record,
    post_callback,
    request_model,
)
from serve_app.outbound import BlockedDestination, Connector, Resolver, check_url, system_resolver
from serve_app.store import job_record_name, step_record_name

logger = logging.getLogger("ray.serve")


class JobRetry(Exception):
    """A run failed and the job has attempts left: the broker delivers it again."""


class JobFailed(Exception):
    """The job ended `failed`: its message goes to the dead-letter queue."""


class Queue(Protocol):
    def enqueue(self, job_id: str, base_url: str) -> None: ...


class Keys(Protocol):
    async def claim(self, key: str, job_id: str) -> str | None: ...

    async def release(self, key: str, job_id: str) -> None: ...


# The generation behind a job: (body, request_id, seed, base_url, on_call_done, *,
# progress_key, priority) -> the response body /api/text2image would have returned.
GenerateFn = Callable[..., Awaitable[dict[str, Any]]]


class RecordStore:
    """Job records in the image store (shared by the submitting and the running side)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def load(self, job_id: str) -> JobRecord:
        try:
            data = await asyncio.to_thread(self.store.get_record, job_record_name(job_id))
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

    async def save(self, record: JobRecord) -> None:
        record.updatedAt = time.time()
        await asyncio.to_thread(self.store.put_record, job_record_name(record.id), dump(record))

    async def delete(self, job_id: str) -> None:
        await asyncio.to_thread(self.store.delete_record, job_record_name(job_id))

    async def steps_done(self, record: JobRecord) -> int:
        """Steps the model replicas have reported for a running job (read, not stored)."""
        calls = record.request.get("number", 1)

        def read(i: int) -> int:
            try:
                return int(self.store.get_record(step_record_name(record.id, i)))
            except (NotFound, ValueError):
                return 0
        done = await asyncio.gather(*(asyncio.to_thread(read, i) for i in range(calls)))
        return min(sum(done), record.progress.stepsTotal)

    async def reset_steps(self, record: JobRecord, calls: int) -> None:
        """A re-run starts its step counts from zero, not from the failed run's."""
        await asyncio.gather(*(
            asyncio.to_thread(self.store.put_record, step_record_name(record.id, i), b"0")
            for i in range(calls)))


class JobService:
    """The ingress side: a job is recorded, its idempotency key claimed, then queued."""

    def __init__(self, store: Any, config: AppConfig, queue: Queue, keys: Keys, *,
                 resolver: Resolver = system_resolver) -> None:
        self.records = RecordStore(store)
        self.config = config
        self.queue = queue
        self.keys = keys
        self.resolver = resolver

    async def submit(self, body: JobRequest, idempotency_key: str | None,
                     base_url: str) -> tuple[JobRecord, bool]:
        """The job's record, and whether it was created now (False: an earlier submission
        with the same idempotency key made it)."""
        if body.callbackUrl is not None:
            await self._check_callback(str(body.callbackUrl), body.callbackUrl.host)
        record = self._new_record(body, base_url)
        # The record is written before the key is claimed: a concurrent submission with the
        # same key that loses the claim can read the winner's record at once.
        await self.records.save(record)
        claimed = False
        try:
            if idempotency_key:
                owner = await self._claim(idempotency_key, record.id)
                if owner is not None:
                    await self.records.delete(record.id)
                    return owner, False
                claimed = True
            await asyncio.to_thread(self.queue.enqueue, record.id, base_url)
        except ServiceError:
            await self.records.delete(record.id)
            raise
        except Exception as exc:  # the broker or the key store cannot be reached
            logger.warning("job %s: could not be queued (%s)", record.id, type(exc).__name__)
            await self.records.delete(record.id)
            if claimed and idempotency_key:
                with contextlib.suppress(Exception):
                    await self.keys.release(idempotency_key, record.id)
            raise JobsUnavailable("the job queue is unavailable; submit again later",
                                  retry_after_s=self.config.ingress.retry_after_s) from None
        return record, True

    async def _check_callback(self, url: str, host: str | None) -> None:
        cfg = self.config.jobs
        if not callback_host_allowed(host, cfg.callback_hosts):
            raise InvalidRequest("callbackUrl names a host this service may not call "
                                 "(jobs.callback_hosts)", field="callbackUrl")
        try:
            # Resolves the host (blocking): off the event loop. The callback is checked
            # again when it is sent, as DNS may answer differently then.
            await asyncio.to_thread(check_url, url, allow_private=cfg.callback_allow_private,
                                    resolver=self.resolver)
        except BlockedDestination as err:
            raise InvalidRequest(f"callbackUrl cannot be called: {err.reason} "
                                 "(jobs.callback_allow_private)", field="callbackUrl") from None

    async def _claim(self, idempotency_key: str, job_id: str) -> JobRecord | None:
        """None: this job owns the key. Else the job the key's first submission made."""
        for _ in range(3):
            owner_id = await self.keys.claim(idempotency_key, job_id)
            if owner_id is None or owner_id == job_id:
                return None
            try:
                return await self.records.load(owner_id)
            except NotFound:
                # The owner's record is gone (expired, or its queueing failed and it is
                # releasing the key): claim again.
                await self.keys.release(idempotency_key, owner_id)
        raise JobsUnavailable("the idempotency key is busy; submit again",
                              retry_after_s=self.config.ingress.retry_after_s)

    async def status(self, job_id: str) -> JobRecord:
        record = await self.records.load(job_id)
        if record.status == "running":
            record.progress.stepsDone = await self.records.steps_done(record)
        return record

    @staticmethod
    def _new_record(body: JobRequest, base: str) -> JobRecord:
        job_id = uuid.uuid4().hex
        now = time.time()
        return JobRecord(
            id=job_id, createdAt=now, updatedAt=now,
            # JSON mode: an image-to-image input image is stored as base64.
            request=body.model_dump(exclude={"callbackUrl"}, mode="json"),
            seed=seed_of(body),
            progress=Progress(total=body.number * body.batch,
                              stepsTotal=body.number * steps_per_call(body)),
            callbackUrl=str(body.callbackUrl) if body.callbackUrl else None,
            statusUrl=f"{base}/api/jobs/{job_id}",
        )


Outcome = Literal["succeeded", "finished_before", "missing"]


class JobRunner:
    """The consumer side: one delivery of a job. Raises JobRetry (deliver again after a
    backoff) or JobFailed (final: dead-letter queue); returns when the job succeeded or
    had already ended (a second delivery of a finished job runs nothing)."""

    def __init__(self, store: Any, config: AppConfig, generate: GenerateFn, *,
                 resolver: Resolver = system_resolver,
                 connector: Connector | None = None) -> None:
        self.records = RecordStore(store)
        self.config = config
        self._generate = generate
        self.resolver = resolver
        self.connector = connector

    async def run(self, job_id: str, base_url: str) -> Outcome:
        cfg = self.config.jobs
        try:
            record = await self.records.load(job_id)
        except NotFound:
            logger.warning("job %s: delivered, but its record is gone (expired)", job_id)
            return "missing"
        if record.status in ("succeeded", "failed"):
            logger.info("job %s: delivered again after it ended %s", job_id, record.status)
            if record.callbackUrl and record.callbackDelivered is None:
                await self._callback(record)  # its consumer died before the callback
            if record.status == "failed":
                raise JobFailed(job_id)
            return "finished_before"
        if record.attempts >= cfg.max_attempts:
            # Every run so far was lost with its consumer (none got to record an outcome).
            return await self._fail(record, {
                "code": "attempts_exhausted",
                "message": f"the job's runs were lost {record.attempts} times"})
        record.status, record.attempts = "running", record.attempts + 1
        record.progress.done = record.progress.stepsDone = 0
        record.error = None
        await self.records.save(record)
        body = request_model(record.request).model_validate(record.request)
        await self.records.reset_steps(record, body.number)

        def progress(images: int) -> None:
            record.progress.done += images

        try:
            record.result = await self._generate_waiting_for_capacity(record, body, base_url,
                                                                      progress)
        except ServiceError as err:
            if record.attempts >= cfg.max_attempts or isinstance(err, InvalidRequest):
                return await self._fail(record, error_body(err)["error"])
            record.status, record.error = "queued", error_body(err)["error"]
            await self.records.save(record)
            logger.warning("job %s: run %d failed (%s); the broker delivers it again",
                           record.id, record.attempts, err.code)
            raise JobRetry(job_id) from None
        except JobRetry:
            # Waited for capacity until the delivery's deadline, attempt not spent: the
            # broker delivers it again (an "unexpected error" would fail the job).
            raise
        except Exception:
            logger.exception("job %s: unexpected error", record.id)
            return await self._fail(record, {"code": "internal_error",
                                             "message": "internal error",
                                             "requestId": record.id})
        record.status = "succeeded"
        record.progress.stepsDone = record.progress.stepsTotal
        await self.records.save(record)
        logger.info("job %s succeeded after %d run(s)", record.id, record.attempts)
        if record.callbackUrl:
            await self._callback(record)
        return "succeeded"

    async def _generate_waiting_for_capacity(self, record: JobRecord, body: Text2ImageRequest,
                                             base_url: str,
                                             progress: Callable[[int], None]) -> dict[str, Any]:
        # Waiting longer in one delivery would outlast the broker's visibility timeout, and
        # the job would be handed to a second consumer while this one still holds it.
        deadline = time.monotonic() + self.config.jobs.broker.visibility_timeout_s / 2
        while True:
            try:
                # Job calls wait behind interactive ones in the batching deployment.
                return await self._generate(body, record.id, record.seed, base_url, progress,
                                            progress_key=record.id, priority="job")
            except (Overloaded, ReplicaLost) as err:
                # A full batching queue, or replicas lost with their node while Serve
                # replaces them, make a job wait, not fail; no attempt is spent.
                record.progress.done = 0
                if time.monotonic() + err.retry_after_s > deadline:
                    record.status, record.attempts = "queued", record.attempts - 1
                    await self.records.save(record)
                    raise JobRetry(record.id) from None
                await asyncio.sleep(err.retry_after_s)

    async def _fail(self, record: JobRecord, error: dict[str, Any]) -> Outcome:
        record.status, record.error = "failed", error
        await self.records.save(record)
        logger.info("job %s failed after %d run(s): %s", record.id, record.attempts,
                    error["code"])
        if record.callbackUrl:
            await self._callback(record)
        raise JobFailed(record.id)

    async def _callback(self, record: JobRecord) -> None:
        cfg = self.config.jobs
        record.callbackDelivered = await asyncio.to_thread(
            post_callback, record.callbackUrl or "", record.public(), cfg.callback_attempts,
            cfg.callback_backoff_s, allow_private=cfg.callback_allow_private,
            resolver=self.resolver, connector=self.connector)
        await self.records.save(record)
