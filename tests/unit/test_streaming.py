"""Server-Sent Events from step records and job status, without Ray: an in-memory store
and scripted generations stand in for the model replicas."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

from serve_app.errors import GenerationFailed, NotFound
from serve_app.ingress.streaming import StepRecords, generation_events, job_events
from serve_app.jobs.records import JobRecord, Progress
from serve_app.store import ImageStore, preview_record_name, step_record_name

KEY = "a" * 32


def parse(chunks: list[bytes]) -> list[tuple[str, dict]]:
    events = []
    for block in b"".join(chunks).decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines()
                     if not line.startswith(":"))
        if lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


async def collect(events) -> list[bytes]:
    return [chunk async for chunk in events]


def store() -> ImageStore:
    return ImageStore(f"memory://{uuid.uuid4().hex}/sd")


def test_one_progress_event_per_step_then_the_result_and_records_removed():
    images = store()

    async def run():
        # two calls of 3 steps, as the replicas would write them
        for step in (1, 2, 3):
            for call in (0, 1):
                images.put_record(step_record_name(KEY, call), str(step).encode())
                images.put_record(preview_record_name(KEY, call, step), bytes([step, call]))
            await asyncio.sleep(0.05)
        return {"id": KEY, "status": "success"}

    records = StepRecords(images, KEY, calls=2)
    events = parse(asyncio.run(collect(
        generation_events(run, records, steps_per_call=3, preview=True, poll_s=0.01))))
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6]
    assert all(p["steps"] == 6 for p in progress)
    # each step its own preview: steps 1-2 are step 1 of calls 0 and 1, and so on
    assert [preview_of(p) for p in progress] == [
        bytes([1, 0]), bytes([1, 1]), bytes([2, 0]), bytes([2, 1]), bytes([3, 0]),
        bytes([3, 1])]
    assert events[-1] == ("result", {"id": KEY, "status": "success"})
    assert records.steps() == [0, 0]
    assert [records.preview(c, s) for c in (0, 1) for s in (1, 2, 3)] == [None] * 6


def preview_of(event: dict) -> bytes:
    prefix = "data:image/png;base64,"
    assert event["preview"].startswith(prefix)
    return base64.b64decode(event["preview"][len(prefix):])


def test_steps_done_between_two_polls_each_carry_their_own_preview():
    """A fast model finishes every step before the first poll (and answers): each step
    still comes with its own preview, in order, none left out."""
    images = store()

    async def run():
        for step in (1, 2, 3, 4):
            images.put_record(preview_record_name(KEY, 0, step), bytes([step]))
            images.put_record(step_record_name(KEY, 0), str(step).encode())
        return {"id": KEY}

    events = parse(asyncio.run(collect(generation_events(
        run, StepRecords(images, KEY, 1), steps_per_call=4, preview=True, poll_s=10.0))))
    progress = [d for n, d in events if n == "progress"]
    assert [(p["step"], preview_of(p)) for p in progress] == [
        (1, bytes([1])), (2, bytes([2])), (3, bytes([3])), (4, bytes([4]))]
    assert events[-1] == ("result", {"id": KEY})


def test_a_step_whose_preview_is_not_written_yet_waits_for_it():
    """The step count can land before that step's preview (one writer, latest value per
    name): the event waits for the preview instead of going without it."""
    images = store()

    async def run():
        images.put_record(step_record_name(KEY, 0), b"1")
        await asyncio.sleep(0.05)  # a few polls see step 1 without its preview
        images.put_record(preview_record_name(KEY, 0, 1), b"p1")
        await asyncio.sleep(0.05)
        return {"id": KEY}

    async def main():
        return await collect(generation_events(
            run, StepRecords(images, KEY, 1), steps_per_call=1, preview=True, poll_s=0.01))

    events = parse(asyncio.run(main()))
    assert [(n, d.get("step"), preview_of(d)) for n, d in events if n == "progress"] == [
        ("progress", 1, b"p1")]
    assert events[-1] == ("result", {"id": KEY})


def test_no_previews_unless_asked():
    images = store()

    async def run():
        images.put_record(step_record_name(KEY, 0), b"1")
        images.put_record(preview_record_name(KEY, 0, 1), b"png")
        await asyncio.sleep(0.05)
        return {"id": KEY}

    events = parse(asyncio.run(collect(generation_events(
        run, StepRecords(images, KEY, 1), steps_per_call=2, preview=False, poll_s=0.01))))
    assert [(n, d["step"]) for n, d in events if n == "progress"] == [
        ("progress", 1), ("progress", 2)]
    assert all("preview" not in d for _, d in events)


def test_a_failed_generation_ends_with_an_error_event():
    async def run():
        raise GenerationFailed("image generation failed", request_id="r1")

    events = parse(asyncio.run(collect(generation_events(
        run, StepRecords(store(), KEY, 1), steps_per_call=4, preview=False, poll_s=0.01))))
    assert events == [("error", {"status": "error", "error": {
        "code": "generation_failed", "message": "image generation failed",
        "requestId": "r1"}})]


def record(status, steps_done=0, done=0, **extra) -> JobRecord:
    return JobRecord(id=KEY, status=status, createdAt=0.0, updatedAt=0.0, request={},
                     seed=1, progress=Progress(done=done, total=1, stepsDone=steps_done,
                                               stepsTotal=4), **extra)


def test_job_events_follow_the_public_status():
    script = [record("running", 1), record("running", 1), record("running", 3),
              record("succeeded", 4, 1, result={"id": "x"})]

    async def status():
        return script.pop(0)

    events = parse(asyncio.run(collect(job_events(status, record("queued"), poll_s=0.0))))
    assert [(n, d.get("status"), d.get("step")) for n, d in events] == [
        ("progress", "queued", 0), ("progress", "running", 1), ("progress", "running", 3),
        ("progress", "succeeded", 4), ("result", "succeeded", None)]
    assert events[-1][1]["result"] == {"id": "x"}


def test_job_events_end_on_failure_or_a_vanished_job():
    async def failed():
        return record("failed", error={"code": "generation_failed", "message": "m"})

    events = parse(asyncio.run(collect(job_events(failed, record("running"), poll_s=0.0))))
    assert events[-1] == ("error", {"status": "error", "error": {
        "code": "generation_failed", "message": "m"}})

    async def gone():
        raise NotFound("job not found")

    events = parse(asyncio.run(collect(job_events(gone, record("running"), poll_s=0.0))))
    assert events[-1] == ("error", {"status": "error", "error": {
        "code": "not_found", "message": "job not found"}})
