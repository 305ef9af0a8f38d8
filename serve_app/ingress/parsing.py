"""HTTP request bodies (JSON, multipart) to validated requests, read within their limits."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar, overload

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serve_app.config import AppConfig, LimitsConfig
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.generation.requests import validate_request
from serve_app.generation.schemas import Text2ImageRequest

MAX_BODY_BYTES = 64 * 1024
# Multipart text fields that are numbers on the JSON side (a form sends only strings).
INT_FORM_FIELDS = frozenset({"number", "step", "batch", "seed", "n", "output_compression",
                             "partial_images"})
FLOAT_FORM_FIELDS = frozenset({"strength"})

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
def parse_request(body: bytes, config: AppConfig, model: type[RequestT],
                  limit: int = ...) -> RequestT: ...


def parse_request(body: bytes, config: AppConfig,
                  model: type[Text2ImageRequest] = Text2ImageRequest,
                  limit: int = MAX_BODY_BYTES) -> Text2ImageRequest:
    """Raw body -> validated request (of `model`, Text2ImageRequest or a subclass such as
    JobRequest). The Content-Type is ignored on purpose: `curl -d` sends
    application/x-www-form-urlencoded and the reference docs use exactly that."""
    if len(body) > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes", field="body")
    return validate_request(load_json_object(body), config, model)


def load_json_object(body: bytes) -> dict[str, Any]:
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
    return data


def image_body_limit(limits: LimitsConfig) -> int:
    """Bodies that carry an image: the image base64-encoded (4/3) plus the other fields."""
    return -(-limits.max_input_image_bytes * 4 // 3) + MAX_BODY_BYTES


def is_multipart(content_type: str | None) -> bool:
    return (content_type or "").lower().startswith("multipart/form-data")


class _InMemoryParser(MultiPartParser):
    # Uploads stay in memory (the body is already bounded): an input image never touches
    # the disk, so nothing of it outlives the request.
    spool_max_size = 2**62


async def parse_form(body: bytes, content_type: str, file_field: str,
                     limits: LimitsConfig) -> dict[str, Any]:
    """A multipart/form-data body (already read within its limit) -> a dict for the JSON
    model: numbers parsed from their text, the one file as base64 under `file_field`."""
    import base64

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    # Two files: a second one (a mask) is then refused by name, not as "too many files".
    parser = _InMemoryParser(Headers({"content-type": content_type}), once(), max_files=2,
                             max_fields=32, max_part_size=MAX_BODY_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"multipart body: {exc.message}", field="body") from None
    data: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                # OpenAI's SDKs name a list of images `image[]`: one is taken.
                if name not in (file_field, file_field + "[]"):
                    raise InvalidRequest(f"file field {name!r} is not supported", field=name)
                name = file_field
                if name in data:
                    raise InvalidRequest(f"one {file_field} only", field=file_field)
                raw = await value.read()
                if len(raw) > limits.max_input_image_bytes:
                    raise PayloadTooLarge(
                        f"image is larger than {limits.max_input_image_bytes} bytes",
                        field=file_field)
                data[name] = base64.b64encode(raw)
            elif name in data:
                raise InvalidRequest(f"field {name!r} is given twice", field=name)
            else:
                data[name] = _form_value(name, value)
    finally:
        await form.close()
    return data


def _form_value(name: str, text: str) -> Any:
    if name in INT_FORM_FIELDS and re.fullmatch(r"-?[0-9]{1,30}", text.strip()):
        return int(text)
    if name in FLOAT_FORM_FIELDS:
        try:
            return float(text)
        except ValueError:
            return text
    return text
