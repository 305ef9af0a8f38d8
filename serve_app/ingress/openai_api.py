"""OpenAI's Images API over the same generation service: /v1/images/generations,
/v1/images/edits (image-to-image) and /v1/models, so the official SDKs work unchanged with
`base_url` pointed at this service.

Mapping (README, "OpenAI-compatible API"): `n` images are `n` model calls of one image
each; `size` must be one of `limits.allowed_sizes` ("auto" or absent: the first of them);
`response_format` is `url` (default) or `b64_json`; `model` is optional and names one of
the served models (GET /v1/models: their ids; absent: the default model); OpenAI's own
model names (dall-e-2, dall-e-3, gpt-image-1) name none and get 400 listing the valid
ids. `quality`, `style`, `user`, `background`, `moderation`, `input_fidelity` and
`output_compression` are accepted and ignored; `output_format` other than png, `mask`,
`stream` and `partial_images` are rejected. Extensions the SDKs pass in
`extra_body`: `seed`, `step`, and for edits `strength`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, NotFound
from serve_app.generation.models import catalog_of
from serve_app.generation.requests import validate_request
from serve_app.generation.schemas import (
    MAX_SEED,
    BodyFormat,
    Image2ImageRequest,
    Text2ImageRequest,
)
from serve_app.generation.service import GenerationService
from serve_app.store import ImageStore

OWNER = "sdxl-turbo-serve"


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error` (4xx) or `server_error` (5xx).")
    param: str | None = Field(default=None, description="The parameter at fault.")
    code: str = Field(description="This service's error code (`invalid_request`, "
                                  "`invalid_image`, `unauthorized`, `overloaded`, ...).")


class OpenAIErrorResponse(BaseModel):
    """Errors under /v1/, in OpenAI's shape (serve_app/errors.py)."""

    error: OpenAIErrorDetail


OPENAI_ERROR_DESCRIPTIONS = {
    400: "Invalid parameters or input image (this API's 422).",
    401: "API keys are on and the bearer token is missing or wrong.",
    404: "Unknown model.",
    413: "The body or the image is too large.",
    500: "The pipeline failed.",
    501: "The backend cannot do image-to-image (openvino).",
    503: "The batching queue is full (`Retry-After`).",
    504: "Generation took longer than `ingress.request_timeout_s`.",
}


# What OpenAI's SDKs parse: ImagesResponse.
OPENAI_IMAGES_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "OpenAI's ImagesResponse: `created` and `data`, one `{url}` or "
                   "`{b64_json}` per image."}}


def openai_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OpenAIErrorResponse,
                   "description": OPENAI_ERROR_DESCRIPTIONS[code]} for code in codes}


class OpenAIImageRequest(BaseModel):
    """The parameters both OpenAI image endpoints share."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, description="A served model's id (GET "
                                                        "/v1/models); absent: the default.")
    n: int | None = Field(default=None, ge=1, le=64, description="Images (model calls).")
    size: str | None = Field(default=None, description="One of the allowed sizes, or "
                                                       "`auto` (the first allowed size).")
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png"] | None = Field(default=None,
                                                 description="Only png is produced.")
    # Accepted and ignored: they have no counterpart in SDXL-Turbo.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    # Rejected when set: no streaming of partial images on this API (see /api/.../stream).
    stream: bool | None = None
    partial_images: int | None = None
    # Extensions (SDK: extra_body={...}).
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    step: int | None = Field(default=None, ge=1, le=1000, strict=True)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt: str) -> str:
        return Text2ImageRequest._prompt_text(prompt)


class OpenAIEditRequest(OpenAIImageRequest):
    """Multipart fields of /v1/images/edits besides the `image` file part."""

    # multipart/form-data only (the SDKs send it so); the image file's raw bytes.
    body_format: ClassVar[BodyFormat] = BodyFormat(json=False, multipart=True, image=True,
                                                   image_base64=False)

    image: bytes
    input_fidelity: str | None = None
    strength: float | None = Field(default=None, gt=0.0, le=1.0)


class OpenAIImagesService:
    """Translates the OpenAI requests to this service's own and the responses back."""

    def __init__(self, generation: GenerationService, store: ImageStore,
                 config: AppConfig) -> None:
        self.generation = generation
        self.store = store
        self.config = config

    def models(self) -> dict[str, Any]:
        """OpenAI's model list: every served model by id, the default first, with this
        service's extra fields (default, source kind, LoRA adapters)."""
        return {"object": "list",
                "data": [self._model_card(entry) for entry in catalog_of(self.config).listing()]}

    def model(self, model_id: str) -> dict[str, Any]:
        catalog = catalog_of(self.config)
        try:
            resolved = catalog.resolve(model_id)
        except InvalidRequest:
            raise NotFound(f"model {model_id!r} is not served here; valid ids: "
                           f"{catalog.ids}", field="model") from None
        return next(self._model_card(entry) for entry in catalog.listing()
                    if entry["id"] == resolved)

    @staticmethod
    def _model_card(entry: dict[str, Any]) -> dict[str, Any]:
        return {"id": entry["id"], "object": "model", "created": 0, "owned_by": OWNER,
                **{k: v for k, v in entry.items() if k != "id"}}

    def to_request(self, body: OpenAIImageRequest) -> Text2ImageRequest:
        """The OpenAI parameters as this service's request (its limits then apply)."""
        for name in ("stream", "partial_images"):
            if getattr(body, name):
                raise InvalidRequest(f"{name} is not supported", field=name)
        sizes = self.config.limits.allowed_sizes
        size = sizes[0] if body.size in (None, "auto") else body.size
        if size not in sizes:
            raise InvalidRequest(f"size must be one of {sizes} or auto", field="size")
        fields: dict[str, Any] = {"prompt": body.prompt, "number": body.n or 1, "size": size,
                                  "batch": 1,
                                  # An unknown name: UnknownModel, 400 here naming the ids.
                                  "model": catalog_of(self.config).resolve(body.model)}
        if body.step is not None:
            fields["step"] = body.step
        if body.seed is not None:
            fields["seed"] = body.seed
        if isinstance(body, OpenAIEditRequest):
            fields["image"] = base64.b64encode(body.image)
            if body.strength is not None:
                fields["strength"] = body.strength
            return validate_request(fields, self.config, Image2ImageRequest)
        return validate_request(fields, self.config, Text2ImageRequest)

    async def respond(self, body: OpenAIImageRequest, generated: dict[str, Any]
                      ) -> dict[str, Any]:
        """This service's response -> OpenAI's ImagesResponse."""
        if body.response_format == "b64_json":
            request_id = generated["id"]
            names = [output["url"].rsplit("/", 1)[1] for output in generated["output"]]
            pngs = await asyncio.gather(*(asyncio.to_thread(self.store.get, request_id, name)
                                          for name in names))
            data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
        else:
            data = [{"url": output["url"]} for output in generated["output"]]
        return {"created": int(time.time()), "data": data}
