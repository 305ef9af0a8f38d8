"""Request bodies to validated requests and model calls: plain functions, no Ray."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TypeVar, overload

from pydantic import ValidationError

from serve_app.config import AppConfig, parse_size
from serve_app.errors import InvalidRequest, PayloadTooLarge, field_of
from serve_app.ingress.schemas import Text2ImageRequest
from serve_app.protocol import GenerationItem, Priority

MAX_BODY_BYTES = 64 * 1024

RequestT = TypeVar("RequestT", bound=Text2ImageRequest)


async def read_body(chunks: AsyncIterator[bytes], declared_length: str | None,
                    limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit`: by the declared
    Content-Length before reading anything, and for chunked bodies (no length declared)
    while reading, so a 100 MB upload costs at most `limit` plus one chunk of memory."""
    if declared_length and declared_length.isdigit() and int(declared_length) > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes", field="body")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes", field="body")
    return bytes(body)


@overload
def parse_request(body: bytes, config: AppConfig) -> Text2ImageRequest: ...


@overload
def parse_request(body: bytes, config: AppConfig, model: type[RequestT]) -> RequestT: ...


def parse_request(body: bytes, config: AppConfig,
                  model: type[Text2ImageRequest] = Text2ImageRequest) -> Text2ImageRequest:
    """Raw body -> validated request (of `model`, Text2ImageRequest or a subclass such as
    JobRequest). The Content-Type is ignored on purpose: `curl -d` sends
    application/x-www-form-urlencoded and the reference docs use exactly that."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body is larger than {MAX_BODY_BYTES} bytes", field="body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("body is not valid UTF-8", field="body") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc.msg}", field="body") from None
    except RecursionError:
        raise InvalidRequest("body is nested too deeply", field="body") from None
    except ValueError as exc:
        # Python's limit on digits in an integer (4300): a 5000-digit `seed` lands here.
        raise InvalidRequest(f"body has a number out of range: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object", field="body")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(first["msg"], field=field_of(tuple(first["loc"]))) from None
    limits = config.limits
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
    return request


def plan_calls(request: Text2ImageRequest, seed: int, progress_key: str | None = None,
               priority: Priority = "interactive") -> list[GenerationItem]:
    """`number` model calls of `batch` images each: the reference service's loop shape.
    Separate calls may land in separate batches, on separate replicas."""
    width, height = parse_size(request.size)
    return [
        GenerationItem(prompt=request.prompt, width=width, height=height, steps=request.step,
                       seed=seed, call_index=i, count=request.batch,
                       progress_key=progress_key, priority=priority)
        for i in range(request.number)
    ]
