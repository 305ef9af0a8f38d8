"""OpenAI's Images API (serve_app/ingress/openai_api.py). Errors here take OpenAI's shape
(serve_app/errors.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from serve_app.generation.schemas import request_body
from serve_app.ingress.openai_api import (
    OPENAI_IMAGES_RESPONSE,
    OpenAIEditRequest,
    OpenAIImageRequest,
    openai_error_responses,
)
from serve_app.ingress.parsing import read_request
from serve_app.ingress.services import IngressServices, Services

router = APIRouter()


@router.get("/v1/models", responses=openai_error_responses(401))
async def openai_models(request: Request,
                        svc: Services) -> JSONResponse:
    svc.authorize(request)
    return JSONResponse(svc.openai.models())


@router.get("/v1/models/{model_id:path}", responses=openai_error_responses(401, 404))
async def openai_model(model_id: str, request: Request,
                       svc: Services) -> JSONResponse:
    svc.authorize(request)
    return JSONResponse(svc.openai.model(model_id))


async def _images(body: OpenAIImageRequest, request: Request,
                  svc: IngressServices) -> dict[str, Any]:
    generated = await svc.generation.generate(svc.openai.to_request(body),
                                              base_url=svc.base_url(request))
    return await svc.openai.respond(body, generated)


@router.post("/v1/images/generations", openapi_extra=request_body(OpenAIImageRequest),
             responses={**OPENAI_IMAGES_RESPONSE,
                        **openai_error_responses(400, 401, 413, 500, 503, 504)})
async def openai_generations(request: Request,
                             svc: Services) -> JSONResponse:
    """OpenAI's images.generate: text-to-image."""
    svc.authorize(request)
    body = await read_request(request, OpenAIImageRequest, svc.config)
    return JSONResponse(await _images(body, request, svc))


@router.post("/v1/images/edits", openapi_extra=request_body(OpenAIEditRequest),
             responses={**OPENAI_IMAGES_RESPONSE,
                        **openai_error_responses(400, 401, 413, 500, 501, 503, 504)})
async def openai_edits(request: Request,
                       svc: Services) -> JSONResponse:
    """OpenAI's images.edit (multipart, as the SDKs send it): image-to-image."""
    svc.authorize(request)
    body = await read_request(request, OpenAIEditRequest, svc.config)
    return JSONResponse(await _images(body, request, svc))
