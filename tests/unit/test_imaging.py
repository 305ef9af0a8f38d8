import io

import numpy as np
import pytest
from PIL import Image

from serve_app.imaging import encode_png, grid_shape, make_grid


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 48, 3)])
def test_png_decodes_to_the_same_pixels(shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(pixels)))
    assert decoded.format == "PNG"
    assert decoded.mode == "RGB"
    assert decoded.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(decoded), pixels)


def photo_like(size: int = 256) -> np.ndarray:
    """Smooth gradients with sensor-like noise: how photographs compress, unlike pure noise."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:size, 0:size]
    smooth = np.stack([x % 256, y % 256, ((x + y) // 2) % 256], -1).astype(np.int16)
    return np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)


def test_png_default_is_run_length_deflate_and_smaller_than_level_1_on_photos():
    import zlib

    pixels = photo_like()
    fast, matched = encode_png(pixels), encode_png(pixels, strategy=zlib.Z_DEFAULT_STRATEGY)
    for data in (fast, matched):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    assert len(fast) < len(matched)
    flat = np.full((64, 64, 3), 200, dtype=np.uint8)  # runs of zero residuals
    assert len(encode_png(flat)) < flat.nbytes // 32  # 222 bytes for 12 KB of pixels


def test_png_rejects_other_layouts():
    with pytest.raises(ValueError, match="expected uint8 HxWx3"):
        encode_png(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8 HxWx3"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))


@pytest.mark.parametrize("count,expected", [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)),
                                            (5, (2, 3)), (9, (3, 3)), (10, (3, 4))])
def test_grid_shape(count, expected):
    assert grid_shape(count) == expected


def test_grid_tiles_row_by_row():
    images = [np.full((2, 3, 3), value, dtype=np.uint8) for value in (10, 20, 30)]
    grid = make_grid(images)
    assert grid.shape == (4, 6, 3)
    assert (grid[:2, :3] == 10).all() and (grid[:2, 3:] == 20).all()
    assert (grid[2:, :3] == 30).all() and (grid[2:, 3:] == 0).all()
