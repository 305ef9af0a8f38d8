"""Requests to model calls: validation against the configured limits, and the plan of
model calls a request makes. Plain functions, no HTTP and no Ray: the HTTP routes, the
OpenAI translation and the job runner all go through them."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from serve_app.config import AppConfig, LimitsConfig, parse_size
from serve_app.errors import InvalidImage, InvalidRequest, field_of
from serve_app.generation.image_input import check_input_image
from serve_app.generation.models import catalog_of
from serve_app.generation.schemas import Image2ImageRequest, Text2ImageRequest
from serve_app.protocol import GenerationItem, Priority, denoising_steps

RequestT = TypeVar("RequestT", bound=Text2ImageRequest)
ModelT = TypeVar("ModelT", bound=BaseModel)
# Seeds drawn for requests that name none (reported back in meta.seed / the job record).
RANDOM_SEEDS = 2**31


def new_request_id() -> str:
    """A request's id: its images' directory in the store, its log lines, its progress key."""
    return uuid.uuid4().hex


def seed_of(request: Text2ImageRequest) -> int:
    """The request's seed, or a random one when it names none."""
    return request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEEDS)


def validate_request(data: Mapping[str, Any], config: AppConfig,
                     model: type[RequestT]) -> RequestT:
    """A decoded body -> the validated request, with the configured limits applied; an
    image-to-image request's image is checked too (bytes, format, sides: no decoding)."""
    request = validate_fields(data, model)
    check_limits(request, config)
    if isinstance(request, Image2ImageRequest):
        check_image_request(request, config.limits)
    return request


def validate_fields(data: Mapping[str, Any], model: type[ModelT]) -> ModelT:
    """Pydantic validation with its first error as a typed 422 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = field_of(tuple(first["loc"]))
        error = InvalidImage if field == "image" else InvalidRequest
        raise error(first["msg"], field=field) from None


def check_image_request(request: Image2ImageRequest, limits: LimitsConfig) -> None:
    """The image request's own rules; an `imageUrl` is fetched and its image checked after
    this (serve_app/ingress/image_url.py), so a request that fails here costs no fetch."""
    if request.image is not None and request.imageUrl is not None:
        raise InvalidRequest("send the input image as image or as imageUrl, not both",
                             field="imageUrl")
    if request.image is None and request.imageUrl is None:
        raise InvalidImage("an input image is required: image (or imageUrl)", field="image")
    # SDXL-Turbo's rule: below 1 diffusers still runs one step, from a later point of
    # the schedule than the strength asks for, so the request would not mean what it says.
    if request.step * request.strength < 1:
        raise InvalidRequest("step x strength must be at least 1", field="strength")
    if request.image is not None:
        check_input_image(request.image, limits)


def check_limits(request: Text2ImageRequest, config: AppConfig) -> None:
    limits = config.limits
    catalog_of(config).resolve(request.model)
    if request.size not in limits.allowed_sizes:
        raise InvalidRequest(f"size must be one of {limits.allowed_sizes}", field="size")
    if request.step > limits.max_steps:
        raise InvalidRequest(f"step must be <= {limits.max_steps}", field="step")
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(f"prompt must be at most {limits.max_prompt_chars} characters",
                             field="prompt")
    if request.batch > config.batching.max_images_per_call:
        raise InvalidRequest(
            f"batch must be <= {config.batching.max_images_per_call} (images per model call)",
            field="batch")
    if request.number * request.batch > limits.max_images_per_request:
        raise InvalidRequest(
            f"number x batch must be <= {limits.max_images_per_request}", field="number")


def steps_per_call(body: Text2ImageRequest) -> int:
    """Denoising steps one call runs (image-to-image skips the first ones)."""
    if isinstance(body, Image2ImageRequest):
        return denoising_steps(body.step, body.strength)
    return body.step


def plan_calls(request: Text2ImageRequest, seed: int, progress_key: str | None = None,
               priority: Priority = "interactive",
               preview: bool = False, model: str | None = None) -> list[GenerationItem]:
    """`number` model calls of `batch` images each: the reference service's loop shape.
    Separate calls may land in separate batches, on separate replicas. `model`: the
    resolved model id the calls run on."""
    width, height = parse_size(request.size)
    image = request.image if isinstance(request, Image2ImageRequest) else None
    if isinstance(request, Image2ImageRequest) and image is None:
        # An imageUrl not fetched yet: without this the calls would run as text to image.
        raise InvalidImage("an input image is required: image (or imageUrl)", field="image")
    strength = request.strength if isinstance(request, Image2ImageRequest) else 1.0
    return [
        GenerationItem(prompt=request.prompt, width=width, height=height, steps=request.step,
                       seed=seed, call_index=i, count=request.batch,
                       progress_key=progress_key, priority=priority, init_image=image,
                       strength=strength, preview=preview, model=model)
        for i in range(request.number)
    ]
