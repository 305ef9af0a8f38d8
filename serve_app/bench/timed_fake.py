"""A fake generator with the real model's timing shape, for serving benchmarks.

On CPU a pipeline call costs about steps x images x pixels: batching gains little compute
(measured 1.05x images/s at batch 4, BENCHMARKS.md), and a 1024x1024 image costs 4x a
512x512 one per step. `unit_s` is one 512x512 image-step (the real full-size model: about
3.5 s on 2 Zen 5 cores; benchmarks scale it down). Only numpy: it also loads into the
pre-batcher code, so the same generator serves both sides of a before/after comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class TimedFakeGenerator:
    def __init__(self, unit_s: float = 0.03) -> None:
        self.unit_s = unit_s
        self.info: dict[str, Any] = {"model": "timed-fake", "backend": "fake",
                                     "dtype": "uint8", "device": "cpu", "threads": 1}

    def generate(self, items: Sequence[Any],
                 on_step: Callable[[int], None] | None = None) -> list[list[np.ndarray]]:
        first = items[0]
        images = sum(item.count for item in items)
        per_step = self.unit_s * images * first.width * first.height / (512 * 512)
        for step in range(1, first.steps + 1):
            time.sleep(per_step)
            if on_step is not None:
                on_step(step)
        return [[np.zeros((item.height, item.width, 3), np.uint8)] * item.count
                for item in items]


def load(config: Any) -> TimedFakeGenerator:
    return TimedFakeGenerator(**config.model.generator_options)
