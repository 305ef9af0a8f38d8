"""Decoding an untrusted image-to-image input, in the model replica (PIL lives here only).

The ingress has already checked the bytes, the format and the declared dimensions
(serve_app/generation/image_input.py); this repeats those checks on what PIL reads, so a
replica is safe on its own, and finds what only decoding finds (truncated or corrupt
data). The pixels are then fitted to the requested size: scaled to cover it, keeping the
aspect ratio, and centre-cropped.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np

from serve_app.config import LimitsConfig


class InvalidInputImage(ValueError):
    """The message is safe to show the client."""


def decode_input_image(data: bytes, width: int, height: int,
                       limits: LimitsConfig) -> np.ndarray:
    """PNG/JPEG bytes -> height x width x 3 uint8, or InvalidInputImage."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > limits.max_input_image_bytes:
        raise InvalidInputImage(f"image is larger than {limits.max_input_image_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its limit, raises) on huge declared sizes: both are
            # refusals here, before a pixel is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
            side_w, side_h = image.size
            if min(side_w, side_h) < limits.min_input_image_side_px or max(
                    side_w, side_h) > limits.max_input_image_side_px:
                raise InvalidInputImage(f"image is {side_w}x{side_h}, outside the limits")
            image.load()  # a truncated stream raises here (LOAD_TRUNCATED_IMAGES is off)
            rgb = image.convert("RGB")
    except InvalidInputImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        raise InvalidInputImage("image is not a PNG or JPEG within the limits") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):
        raise InvalidInputImage("image data is truncated or corrupt") from None
    fitted = ImageOps.fit(rgb, (width, height), Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8).copy()
