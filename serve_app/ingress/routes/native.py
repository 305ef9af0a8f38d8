"""The native API (stable-diffusion-ipex compatible): text- and image-to-image, the stored
images, the probes and the playground page."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from serve_app.errors import NotReady, to_response
from serve_app.generation.models import catalog_of
from serve_app.generation.schemas import (
    Image2ImageRequest,
    Image2ImageResponse,
    ReadyResponse,
    Text2ImageRequest,
    Text2ImageResponse,
    error_responses,
    request_body,
)
from serve_app.ingress.parsing import read_request
from serve_app.ingress.services import IngressServices, Services
from serve_app.metrics import record_error

logger = logging.getLogger("ray.serve")

# The playground page at `/`: plain HTML/JS calling the API with relative URLs.
PLAYGROUND_PAGE = Path(__file__).parents[1] / "static" / "index.html"

router = APIRouter()


def server_timing(timings: dict[str, float]) -> str:
    """The W3C Server-Timing header: `pipeline;dur=581.2, model;dur=590.4` (milliseconds)."""
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in timings.items())


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(PLAYGROUND_PAGE.read_text(encoding="utf-8"))


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _not_ready(message: str) -> JSONResponse:
    record_error(NotReady.code)
    return to_response(NotReady(message))


@router.get("/readyz", responses={200: {"model": ReadyResponse}, **error_responses(503)})
async def readyz(svc: Services) -> JSONResponse:
    readiness = await svc.readiness.check()
    if readiness.state == "loading":
        return _not_ready("model is loading")
    if readiness.state == "unavailable":
        logger.warning("readiness probe failed: %s", readiness.detail)
        return _not_ready("model is not available")
    info = readiness.info or {}
    return JSONResponse({
        "status": "ready",
        "busy": readiness.state == "busy",
        "model": info.get("model"),
        "backend": info.get("backend"),
        "backendReason": info.get("backend_reason"),
        "dtype": info.get("dtype"),
        "dtypeReason": info.get("dtype_reason"),
        "profile": info.get("profile"),
        "parts": info.get("parts"),
        "cpu": info.get("cpu"),
        "device": info.get("device"),
        "threads": info.get("threads"),
        "tee": info.get("tee"),
        "protections": svc.protections,
        "optimizations": {"applied": info.get("optimizations", []),
                          "skipped": info.get("optimizations_skipped", {})},
        "warnings": info.get("warnings", []),
        # Every served model; `loaded`: held by the model replica that answered.
        "models": catalog_of(svc.config).listing(loaded=info.get("models_loaded")),
    })


async def _generate(body: Text2ImageRequest, request: Request,
                    svc: IngressServices) -> JSONResponse:
    timings: dict[str, float] = {}
    response = await svc.generation.generate(body, base_url=svc.base_url(request),
                                             timings=timings)
    # No X-Request-ID of ours: Ray Serve's proxy sets that header (the client's own, or
    # its trace id) and logs it beside our id; a second value would contradict it.
    return JSONResponse(response, headers={"Server-Timing": server_timing(timings)})


@router.post("/api/text2image", response_model=Text2ImageResponse,
             openapi_extra=request_body(Text2ImageRequest),
             responses=error_responses(401, 413, 422, 500, 503, 504))
async def text2image(request: Request,
                     svc: Services) -> JSONResponse:
    svc.authorize(request)
    return await _generate(await read_request(request, Text2ImageRequest, svc.config),
                           request, svc)


@router.post("/api/image2image", response_model=Image2ImageResponse,
             openapi_extra=request_body(Image2ImageRequest),
             responses=error_responses(401, 413, 422, 500, 501, 503, 504))
async def image2image(request: Request,
                      svc: Services) -> JSONResponse:
    """Image-to-image: the text-to-image fields plus `image` and `strength`. The input
    image is fitted to `size` (scaled to cover it, centre-cropped) and never stored."""
    svc.authorize(request)
    return await _generate(await read_request(request, Image2ImageRequest, svc.config),
                           request, svc)


@router.get("/images/{image_id}/{name}", responses=error_responses(401, 404))
async def image(image_id: str, name: str, request: Request,
                svc: Services) -> Response:
    svc.authorize(request, image=True)
    data = await asyncio.to_thread(svc.store.get, image_id, name)
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})
