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
