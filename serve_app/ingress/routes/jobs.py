"""Async jobs (serve_app/jobs/service.py): submit, then poll the status or get a callback."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from serve_app.generation.schemas import error_responses, request_body
from serve_app.ingress.parsing import read_request
from serve_app.ingress.services import Services
from serve_app.jobs.records import Image2ImageJobRequest, JobRequest

router = APIRouter()


@router.post("/api/jobs", status_code=202,
             openapi_extra=request_body(JobRequest, Image2ImageJobRequest),
             responses={200: {"description": "The job this Idempotency-Key already made."},
                        **error_responses(401, 413, 422, 503)})
async def submit_job(request: Request,
                     svc: Services) -> JSONResponse:
    """Queue a generation; poll the status URL, or get a POST at `callbackUrl`."""
    svc.authorize(request)
    # With an `image`, an image-to-image job; otherwise the 64 KiB limit holds.
    body = await read_request(request, (JobRequest, Image2ImageJobRequest), svc.config)
    record, created = await svc.jobs.submit(
        body, request.headers.get("idempotency-key"), svc.base_url(request))
    if not created:  # the same Idempotency-Key as an earlier submission
        return JSONResponse(record.public(), status_code=200)
    return JSONResponse(record.public(), status_code=202,
                        headers={"Location": record.statusUrl or ""})


@router.get("/api/jobs/{job_id}", responses=error_responses(401, 404))
async def job_status(job_id: str, request: Request,
                     svc: Services) -> JSONResponse:
    svc.authorize(request)
    return JSONResponse((await svc.jobs.status(job_id)).public())
