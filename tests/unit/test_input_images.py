"""Untrusted image-to-image inputs: the ingress's header checks (no decoding) and the model
replica's decode under the same limits. Each bad case is a typed 4xx error."""

import asyncio
import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app.config import AppConfig, LimitsConfig
from serve_app.errors import InvalidImage, InvalidRequest, PayloadTooLarge
from serve_app.generation.image_input import check_input_image, read_header
from serve_app.generation.schemas import Image2ImageRequest
from serve_app.ingress.parsing import parse_form
from serve_app.model.input_image import InvalidInputImage, decode_input_image
from tests.unit.test_request_parsing import parse_request

LIMITS = LimitsConfig()


def png(width: int, height: int, color=(200, 30, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 240)).save(out, "JPEG", quality=90)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's opening: huge declared dimensions in a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(
        ">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    idat = zlib.compress(b"\x00" * 100000, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", len(idat)) + b"IDAT" + idat
            + b"\x00\x00\x00\x00")


def test_headers_give_format_and_size_without_decoding():
    assert read_header(png(640, 480)) == read_header(png(640, 480))
    header = read_header(png(640, 480))
    assert (header.format, header.width, header.height) == ("png", 640, 480)
    header = read_header(jpeg(300, 200))
    assert (header.format, header.width, header.height) == ("jpeg", 300, 200)


@pytest.mark.parametrize("data, error, message", [
    (b"GIF89a" + b"\x00" * 50, InvalidImage, "must be a PNG or JPEG"),
    (b"not an image at all", InvalidImage, "must be a PNG or JPEG"),
    (b"", InvalidImage, "image is empty"),
    (png(1, 1), InvalidImage, "is 1x1; each side must be at least 64"),
    (png_header_only(10000, 10000), InvalidImage, "is 10000x10000; each side must be at most"),
    (png_header_only(50000, 50000), InvalidImage, "is 50000x50000"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", InvalidImage, "damaged PNG"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", InvalidImage, "damaged JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * (9 * 1024 * 1024), PayloadTooLarge, "larger than"),
])
def test_bad_inputs_are_refused_from_the_header(data, error, message):
    with pytest.raises(error, match=message) as caught:
        check_input_image(data, LIMITS)
    assert caught.value.field == "image"
    assert caught.value.status_code in (413, 422)


def test_decode_fits_the_image_to_the_requested_size():
    pixels = decode_input_image(png(800, 400), 512, 512, LIMITS)
    assert pixels.shape == (512, 512, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[256, 256]) == (200, 30, 60)
    assert decode_input_image(jpeg(300, 200), 64, 128, LIMITS).shape == (128, 64, 3)


@pytest.mark.parametrize("data", [
    png(256, 256)[:-200],  # truncated
    png_header_only(512, 512),  # pixels missing
    png_header_only(10000, 10000),  # over the side limit
    png_header_only(50000, 50000),  # a bomb: PIL's own limit too
    png(1, 1),
    b"garbage" * 100,
    jpeg(256, 256)[:300],
])
def test_bad_inputs_do_not_decode_in_the_replica(data):
    with pytest.raises(InvalidInputImage):
        decode_input_image(data, 512, 512, LIMITS)


def body(**fields):
    import json

    return json.dumps({"prompt": "p", **fields}).encode()


def test_image_request_in_json_with_base64_or_a_data_url():
    config = AppConfig()
    data = png(128, 128)
    encoded = base64.b64encode(data).decode()
    limit = 12 * 1024 * 1024
    request = parse_request(body(image=encoded, strength=0.5), config, Image2ImageRequest,
                            limit)
    assert (request.image, request.strength) == (data, 0.5)
    request = parse_request(body(image="data:image/png;base64," + encoded), config,
                            Image2ImageRequest, limit)
    assert request.image == data
    with pytest.raises(InvalidImage, match="at least 64") as caught:
        parse_request(body(image=base64.b64encode(png(1, 1)).decode()), config,
                      Image2ImageRequest, limit)
    assert caught.value.field == "image"
    with pytest.raises(InvalidRequest, match="step x strength must be at least 1") as caught:
        parse_request(body(image=encoded, step=1, strength=0.5), config, Image2ImageRequest,
                      limit)
    assert caught.value.field == "strength"
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body(image=encoded, strength=1.5), config, Image2ImageRequest, limit)
    assert caught.value.field == "strength"
    with pytest.raises(InvalidImage) as caught:
        parse_request(body(image="!!!not base64"), config, Image2ImageRequest, limit)
    assert caught.value.field == "image"


def multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, str]:
    boundary = "XyZboundary42"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                     'filename="in.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}")


def test_multipart_fields_become_the_json_request():
    asyncio.run(multipart_fields_become_the_json_request())


async def multipart_fields_become_the_json_request():
    from serve_app.generation.requests import validate_request

    data = png(96, 96)
    raw, content_type = multipart({"prompt": "a cat", "step": "2", "strength": "0.75",
                                   "seed": "7"}, data)
    fields = await parse_form(raw, content_type, "image", LIMITS)
    request = validate_request(fields, AppConfig(), Image2ImageRequest)
    assert (request.prompt, request.step, request.strength, request.seed, request.image) == (
        "a cat", 2, 0.75, 7, data)
    raw, content_type = multipart({"prompt": "a cat", "step": "two"}, data)
    with pytest.raises(InvalidRequest) as caught:
        validate_request(await parse_form(raw, content_type, "image", LIMITS), AppConfig(),
                         Image2ImageRequest)
    assert caught.value.field == "step"
    raw, content_type = multipart({"prompt": "a cat"}, None)
    with pytest.raises(InvalidImage) as caught:
        validate_request(await parse_form(raw, content_type, "image", LIMITS), AppConfig(),
                         Image2ImageRequest)
    assert caught.value.field == "image"


class ErrorBatcher:
    """A batcher handle whose calls all come back with one error from the replica."""

    def __init__(self, error: str, message: str) -> None:
        from serve_app.protocol import ModelResult

        self.result = ModelResult(error=error, message=message)
        self.generate = self
        self.calls: list = []

    def remote(self, call):
        self.calls.append(call)

        async def answer():
            return self.result
        return answer()


@pytest.mark.parametrize("error, status, code", [
    ("invalid_image", 422, "invalid_image"),
    ("not_supported", 501, "not_supported"),
])
def test_replica_errors_that_are_the_clients_become_typed_4xx_or_501(error, status, code):
    import uuid

    from serve_app.errors import ServiceError
    from serve_app.generation.service import GenerationService
    from serve_app.store import ImageStore

    batcher = ErrorBatcher(error, "the replica's message")
    generation = GenerationService(batcher, ImageStore(f"memory://{uuid.uuid4().hex}/s"),
                                   AppConfig())
    request = Image2ImageRequest.model_validate(
        {"prompt": "p", "image": base64.b64encode(png(64, 64)), "strength": 0.5})
    with pytest.raises(ServiceError) as caught:
        asyncio.run(generation.generate(request, "f" * 32, 1, "http://h"))
    assert (caught.value.status_code, caught.value.code, caught.value.message) == (
        status, code, "the replica's message")
    [call] = batcher.calls
    assert (call.kind, call.init_image, call.strength) == ("img2img", png(64, 64), 0.5)
