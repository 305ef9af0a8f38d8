"""The small interface between a model replica and whatever makes the pixels.

The replica only needs `info` and `generate`; tests of HTTP behaviour plug in a fake
through `model.generator`, the real path loads diffusers (serve_app.model.pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from serve_app.protocol import GenerationItem

# After denoising step n (1-based): one small HxWx3 uint8 preview per image of the call.
PreviewCallback = Callable[[int, list[np.ndarray]], None]


class ImageGenerator(Protocol):
    info: dict[str, Any]

    def generate(self, items: Sequence[GenerationItem],
                 on_step: Callable[[int], None] | None = None,
                 on_preview: PreviewCallback | None = None,
                 init_images: Sequence[np.ndarray] | None = None) -> list[list[np.ndarray]]:
        """Items of one batch key (kind, shape, strength) -> per item, `count` HxWx3 uint8.
        `on_step(n)` is called after denoising step n (1-based) when given; `on_preview`
        too, with previews, and only then are previews computed. Image-to-image items come
        with `init_images`: per item, its decoded input fitted to the item's size."""
        ...
