"""Live progress as Server-Sent Events (serve_app/ingress/streaming.py): a generation
streamed as it runs, and an async job's status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from serve_app.generation.requests import new_request_id, steps_per_call
from serve_app.generation.schemas import (
    Image2ImageRequest,
    Text2ImageRequest,
    error_responses,
    request_body,
)
from serve_app.ingress.parsing import read_request
from serve_app.ingress.services import IngressServices, Services
from serve_app.ingress.streaming import (
    EVENT_STREAM_RESPONSE,
    SSE_HEADERS,
    StepRecords,
    generation_events,
    job_events,
)

router = APIRouter()


def _stream(body: Text2ImageRequest, request: Request, preview: bool,
            svc: IngressServices) -> StreamingResponse:
    """Validation errors were raised before this (plain JSON 4xx); from here on,
    errors are `error` events of a 200 stream."""
    # The request's id is its progress key too: the stream needs it before the service.
    request_id = new_request_id()
    base_url = svc.base_url(request)

    def run() -> Any:
        return svc.generation.generate(body, request_id, base_url=base_url,
                                       progress_key=request_id, preview=preview)
    events = generation_events(run, StepRecords(svc.store, request_id, body.number),
                               steps_per_call(body), preview)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/api/text2image/stream", response_class=StreamingResponse,
             openapi_extra=request_body(Text2ImageRequest),
             responses={**EVENT_STREAM_RESPONSE, **error_responses(401, 413, 422)})
async def text2image_stream(request: Request, svc: Services,
                            preview: bool = False) -> StreamingResponse:
    """/api/text2image as Server-Sent Events; `?preview=true` adds a small preview
    image to the step events (computed only then)."""
    svc.authorize(request)
    body = await read_request(request, Text2ImageRequest, svc.config)
    return _stream(body, request, preview, svc)


@router.post("/api/image2image/stream", response_class=StreamingResponse,
             openapi_extra=request_body(Image2ImageRequest),
             responses={**EVENT_STREAM_RESPONSE, **error_responses(401, 413, 422)})
async def image2image_stream(request: Request, svc: Services,
                             preview: bool = False) -> StreamingResponse:
    """/api/image2image as Server-Sent Events (see /api/text2image/stream)."""
    svc.authorize(request)
    body = await read_request(request, Image2ImageRequest, svc.config)
    return _stream(body, request, preview, svc)


@router.get("/api/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={**EVENT_STREAM_RESPONSE, **error_responses(401, 404)})
async def job_event_stream(job_id: str, request: Request,
                           svc: Services) -> StreamingResponse:
    """A job's progress as Server-Sent Events, from its status: `progress` when it
    changes (with `status`, `done`, `total`), then `result` (the job record) or
    `error`. No previews."""
    svc.authorize(request)
    first = await svc.jobs.status(job_id)  # 404 before any event
    return StreamingResponse(job_events(lambda: svc.jobs.status(job_id), first),
                             media_type="text/event-stream", headers=SSE_HEADERS)
