"""HTTP request bodies (JSON, multipart) to validated requests, read within their limits."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from serve_app.config import AppConfig, LimitsConfig
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.generation.requests import ModelT, validate_fields, validate_request
from serve_app.generation.schemas import JSON_BODY, Image2ImageRequest, Text2ImageRequest
from serve_app.ingress.image_url import fetch_input_image

MAX_BODY_BYTES = 64 * 1024
# Multipart text fields that are numbers on the JSON side (a form sends only strings).
INT_FORM_FIELDS = frozenset({"number", "step", "batch", "seed", "n", "output_compression",
                             "partial_images"})
FLOAT_FORM_FIELDS = frozenset({"strength"})

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


async def read_request(request: Request, model: type[ModelT] | tuple[type[ModelT], ...],
                       config: AppConfig) -> ModelT:
    """Every route's body -> its validated request, one way for all of them: read within
    the limit (64 KiB, or room for the input image where the model may carry one), decoded
    as the model accepts it (JSON whatever the Content-Type; multipart/form-data with the
    image as a file part; serve_app.generation.schemas.BodyFormat), validated (this
    service's requests with the configured limits, others field by field).

    Several models: the body is read as the one that carries an image when it has an
    `image` or `imageUrl` field, else the one that does not (an async job: text- or
    image-to-image); without an image the 64 KiB limit holds. An `imageUrl` is fetched
    here, once the rest is valid (serve_app/ingress/image_url.py)."""
    variants = model if isinstance(model, tuple) else (model,)
    formats = [getattr(v, "body_format", JSON_BODY) for v in variants]
    limits = config.limits
    limit = image_body_limit(limits) if any(f.image for f in formats) else MAX_BODY_BYTES
    raw = await read_body(request.stream(), request.headers.get("content-length"), limit)
    content_type = request.headers.get("content-type")
    if any(f.multipart for f in formats) and is_multipart(content_type):
        data = await parse_form(raw, content_type or "", "image", limits)
        if not all(f.image_base64 for f in formats) and isinstance(data.get("image"), bytes):
            data["image"] = base64.b64decode(data["image"])  # the file part's own bytes
    elif not any(f.json for f in formats):
        raise InvalidRequest("send multipart/form-data with the image as a file part",
                             field="body")
    else:
        data = load_json_object(raw)
    chosen, chosen_format = variants[0], formats[0]
    if len(variants) > 1:
        has_image = "image" in data or "imageUrl" in data
        chosen, chosen_format = next(
            ((v, f) for v, f in zip(variants, formats) if f.image == has_image),
            (chosen, chosen_format))
    if not chosen_format.image and len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body is larger than {MAX_BODY_BYTES} bytes", field="body")
    if issubclass(chosen, Text2ImageRequest):
        validated = validate_request(data, config, chosen)
        if isinstance(validated, Image2ImageRequest):
            # Every other field is valid by now: a bad request costs no fetch.
            return await fetch_input_image(validated, config)
        return validated
    return validate_fields(data, chosen)


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
