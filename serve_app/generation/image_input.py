"""Untrusted input images, checked in the ingress without decoding them.

The ingress must not import PIL (tests/unit/test_layout.py), and it need not: the format
and the dimensions are in the first bytes of a PNG (IHDR) or a JPEG (its SOF marker). So
the ingress refuses, with a 4xx and before any pixel is decoded anywhere: too many bytes,
anything that is not a PNG or JPEG, and dimensions outside the limits (a 1x1, a
10000x10000, a decompression bomb declaring 50000x50000 in a few KB). What only a full
decode finds (a truncated or corrupt stream) is found by the model replica, which decodes
under the same limits (serve_app/model/input_image.py) and answers `invalid_image`, also a
4xx. Input images are never stored: they live in memory for the request only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidImage, PayloadTooLarge

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# JPEG start-of-frame markers (they carry the dimensions); C4, C8 and CC are not frames.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
STANDALONE_MARKERS = frozenset(range(0xD0, 0xDA)) | {0x01}


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "png" or "jpeg"
    width: int
    height: int


def read_header(data: bytes) -> ImageHeader:
    """Format and dimensions from the header; InvalidImage when it is neither format."""
    if data.startswith(PNG_SIGNATURE):
        # The first chunk must be IHDR: length 13, then width and height.
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise InvalidImage("image is a damaged PNG (no IHDR header)", field="image")
        width, height = struct.unpack(">II", data[16:24])
        return ImageHeader("png", width, height)
    if data.startswith(JPEG_SOI):
        return _jpeg_header(data)
    raise InvalidImage("image must be a PNG or JPEG file", field="image")


def _jpeg_header(data: bytes) -> ImageHeader:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise InvalidImage("image is a damaged JPEG (bad marker)", field="image")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            raise InvalidImage("image is a damaged JPEG (bad segment length)", field="image")
        if marker in SOF_MARKERS:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return ImageHeader("jpeg", width, height)
        if marker == 0xDA:  # scan data before any frame header
            break
        pos += 2 + length
    raise InvalidImage("image is a damaged JPEG (no frame header)", field="image")


def check_input_image(data: bytes, limits: LimitsConfig) -> ImageHeader:
    """The checks that need no decoding: bytes, format, each side within the limits."""
    if len(data) > limits.max_input_image_bytes:
        raise PayloadTooLarge(
            f"image is larger than {limits.max_input_image_bytes} bytes", field="image")
    if not data:
        raise InvalidImage("image is empty", field="image")
    header = read_header(data)
    low, high = limits.min_input_image_side_px, limits.max_input_image_side_px
    if min(header.width, header.height) < low:
        raise InvalidImage(
            f"image is {header.width}x{header.height}; each side must be at least {low} "
            "pixels", field="image")
    if max(header.width, header.height) > high:
        raise InvalidImage(
            f"image is {header.width}x{header.height}; each side must be at most {high} "
            "pixels", field="image")
    return header
