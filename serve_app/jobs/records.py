"""Async jobs: records kept in the image store, callbacks with retries.

A job's record lives at `<store>/jobs/job-<id>.json`, so it survives an ingress restart and
any ingress replica can answer for it. The job itself travels through the broker
(serve_app.jobs.broker), which delivers it again if its consumer dies.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, HttpUrl

from serve_app.generation.schemas import BodyFormat, Image2ImageRequest, Text2ImageRequest
from serve_app.outbound import (
    BlockedDestination,
    Connector,
    Resolver,
    check_url,
    host_allowed,
    open_connection,
    system_resolver,
)

logger = logging.getLogger("ray.serve")

JobStatus = Literal["queued", "running", "succeeded", "failed"]
CALLBACK_TIMEOUT_S = 10.0


class JobRequest(Text2ImageRequest):
    callbackUrl: HttpUrl | None = Field(
        default=None, description="Gets a POST of the job record when the job ends.")


class Image2ImageJobRequest(Image2ImageRequest, JobRequest):
    """An image-to-image job: the input image is kept in the job record (base64), so a
    job taken over by another ingress can run; it expires with the record (store.ttl_s)."""

    # JSON only, as every job body (the image in base64).
    body_format: ClassVar[BodyFormat] = BodyFormat(image=True)


def request_model(request: dict[str, Any]) -> type[Text2ImageRequest]:
    """The request type a stored job request is read back as."""
    return Image2ImageRequest if "image" in request else Text2ImageRequest


class Progress(BaseModel):
    # Images finished, of `total`.
    done: int = 0
    total: int
    # Denoising steps finished over all calls, of `stepsTotal` (number x step).
    stepsDone: int = 0
    stepsTotal: int = 0


class JobRecord(BaseModel):
    id: str
    status: JobStatus = "queued"
    createdAt: float
    updatedAt: float
    request: dict[str, Any]
    seed: int
    progress: Progress
    attempts: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    callbackUrl: str | None = None
    callbackDelivered: bool | None = None
    statusUrl: str | None = None

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def dump(record: JobRecord) -> bytes:
    return json.dumps(record.public()).encode()


def load(data: bytes) -> JobRecord:
    return JobRecord.model_validate_json(data)


def lost_record(job_id: str) -> JobRecord:
    """What a job whose record cannot be read reports: failed, with a clear error."""
    return JobRecord(
        id=job_id, status="failed", createdAt=0.0, updatedAt=0.0, request={}, seed=0,
        progress=Progress(total=0),
        error={"code": "job_lost", "message": "the job's record was damaged and it cannot "
                                              "run again; submit it again"})


# Callbacks and image URLs (ingress.image_url.hosts) match hosts by one rule.
callback_host_allowed = host_allowed


def post_callback(url: str, payload: dict[str, Any], attempts: int, backoff_s: float, *,
                  allow_private: bool = False, resolver: Resolver = system_resolver,
                  connector: Connector | None = None) -> bool:
    """POST the payload; retry on errors and non-2xx with exponential backoff. Each attempt
    resolves the host once, checks the addresses (serve_app.outbound) and connects to the
    one checked; a host that now resolves to an address inside is not called at all.
    Redirects are not followed (a 3xx counts as a failed attempt)."""
    body = json.dumps(payload).encode()
    for attempt in range(1, attempts + 1):
        try:
            dest = check_url(url, allow_private=allow_private, resolver=resolver)
        except BlockedDestination as err:
            logger.warning("callback refused: %s", err.reason)
            return False
        conn = open_connection(dest, CALLBACK_TIMEOUT_S, connector)
        try:
            conn.request("POST", dest.target, body=body,
                         headers={"Content-Type": "application/json"})
            if 200 <= conn.getresponse().status < 300:
                return True
        except Exception as exc:
            logger.warning("callback attempt %d/%d failed: %s", attempt, attempts,
                           type(exc).__name__)
        finally:
            conn.close()
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return False
