"""Server-Sent Events for a generation and for an async job: progress per denoising step,
optional previews, then the result.

No second progress channel: the model replicas already write each call's denoising steps
to the store under a progress key (serve_app/model/step_progress.py, for async jobs); a
streamed request uses its request id as that key, and when the client asked for previews
the replica writes a small preview PNG beside each step count. This module polls those
records and turns changes into events. A job's stream polls only the job's public status
(JobService.status), so it works whatever runs the jobs.

Events (`event:` name, `data:` JSON):
* `progress`: `{"step", "steps", "elapsedSeconds"}` plus `"preview"` (a data: URL of a PNG,
  1/8 of the image's side) when asked for. One event per denoising step, in order (steps
  over all calls of the request: `number x` the steps a call runs), each with its own step's
  preview (the replica writes one record per step). For jobs
  the events carry `"status"`, `"done"`, `"total"` too, and come when the status changes.
* `result`: the body the non-streaming endpoint returns (for jobs: the job record).
* `error`: the error body (`{"status": "error", "error": {...}}`); the stream then ends.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from serve_app.errors import NotFound, ServiceError, error_body
from serve_app.jobs.records import JobRecord
from serve_app.store import ImageStore, preview_record_name, step_record_name

logger = logging.getLogger("ray.serve")

# The OpenAPI description of every event-stream route's 200 response.
EVENT_STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-Sent Events: `progress` per denoising step (`step`, `steps`, "
                   "`elapsedSeconds`, `preview` when asked for), then `result` (the JSON "
                   "body the plain endpoint returns) or `error`.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

POLL_S = 0.1
JOB_POLL_S = 0.25
# A comment line now and then keeps proxies from closing a quiet stream (a queued job).
KEEPALIVE_S = 15.0


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class StepRecords:
    """Reads what the model replicas wrote for one progress key: steps per call, and the
    preview of each call's steps."""

    def __init__(self, store: ImageStore, key: str, calls: int) -> None:
        self.store = store
        self.key = key
        self.calls = calls

    def _read(self, name: str) -> bytes | None:
        try:
            return self.store.get_record(name)
        except NotFound:
            return None

    def steps(self) -> list[int]:
        out = []
        for i in range(self.calls):
            data = self._read(step_record_name(self.key, i))
            try:
                out.append(int(data) if data else 0)
            except ValueError:
                out.append(0)
        return out

    def preview(self, call_index: int, step: int) -> bytes | None:
        return self._read(preview_record_name(self.key, call_index, step))

    def delete(self, steps_per_call: int) -> None:
        for i in range(self.calls):
            names = [step_record_name(self.key, i)]
            names += [preview_record_name(self.key, i, n) for n in range(1, steps_per_call + 1)]
            for name in names:
                try:
                    self.store.delete_record(name)
                except Exception:  # best effort: the TTL cleanup removes what is left
                    logger.debug("could not delete %s", name)


def _new_steps(before: list[int], now: list[int], steps_per_call: int) -> list[tuple[int, int]]:
    """The (call, step) pairs finished since `before`, in the order they most likely
    finished: by step, then call (a request's calls run side by side in one batch)."""
    pairs = [(step, call) for call, (old, new) in enumerate(zip(before, now))
             for step in range(old + 1, min(new, steps_per_call) + 1)]
    return [(call, step) for step, call in sorted(pairs)]


async def generation_events(run: Callable[[], Awaitable[dict[str, Any]]],
                            records: StepRecords, steps_per_call: int, preview: bool,
                            poll_s: float = POLL_S) -> AsyncIterator[bytes]:
    """Runs the generation (`run`) and yields its events until its result or error: one
    `progress` event per step, each with that step's own preview when asked for."""
    started = time.perf_counter()
    total = steps_per_call * records.calls
    task = asyncio.ensure_future(run())
    seen = [0] * records.calls  # per call, the steps already sent
    sent = 0

    async def progress(finished: bool) -> AsyncIterator[bytes]:
        nonlocal sent
        now = await asyncio.to_thread(records.steps)
        elapsed = round(time.perf_counter() - started, 3)
        for call, step in _new_steps(seen, now, steps_per_call):
            event: dict[str, Any] = {"step": sent + 1, "steps": total,
                                     "elapsedSeconds": elapsed}
            if preview:
                image = await asyncio.to_thread(records.preview, call, step)
                if image is None and not finished:
                    return  # its preview is still being written: sent at the next poll
                if image is not None:
                    event["preview"] = ("data:image/png;base64,"
                                        + base64.b64encode(image).decode())
            seen[call] = step
            sent += 1
            yield sse("progress", event)

    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                break
            async for chunk in progress(finished=False):
                yield chunk
        try:
            result = task.result()
        except ServiceError as err:
            yield sse("error", error_body(err))
            return
        except Exception:
            logger.exception("streamed generation failed")
            yield sse("error", error_body(ServiceError("internal error")))
            return
        # The replica wrote every step's record before answering: the steps since the
        # last poll, with their previews, then any a failed progress write left out.
        async for chunk in progress(finished=True):
            yield chunk
        elapsed = round(time.perf_counter() - started, 3)
        for n in range(sent + 1, total + 1):
            yield sse("progress", {"step": n, "steps": total, "elapsedSeconds": elapsed})
        yield sse("result", result)
    finally:
        if not task.done():  # the client left: its calls give their places back
            task.cancel()
        await asyncio.to_thread(records.delete, steps_per_call)


async def job_events(status: Callable[[], Awaitable[JobRecord]], first: JobRecord,
                     poll_s: float = JOB_POLL_S,
                     keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    """A job's progress from its public status, until it succeeds or fails."""
    started = time.perf_counter()
    record, last, quiet_since = first, None, time.perf_counter()
    while True:
        progress = record.progress
        state = (record.status, progress.stepsDone, progress.done)
        if state != last:
            last, quiet_since = state, time.perf_counter()
            yield sse("progress", {
                "status": record.status, "step": progress.stepsDone,
                "steps": progress.stepsTotal, "done": progress.done, "total": progress.total,
                "elapsedSeconds": round(time.perf_counter() - started, 3)})
        elif time.perf_counter() - quiet_since > keepalive_s:
            quiet_since = time.perf_counter()
            yield b": keep-alive\n\n"
        if record.status == "succeeded":
            yield sse("result", record.public())
            return
        if record.status == "failed":
            yield sse("error", {"status": "error", "error": record.error or {}})
            return
        await asyncio.sleep(poll_s)
        try:
            record = await status()
        except ServiceError as err:
            yield sse("error", error_body(err))
            return
