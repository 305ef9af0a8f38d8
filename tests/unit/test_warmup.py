"""The replica's warm-up runs one step per size: the first call at a size is what warms the
networks; a second step would only repeat the UNet (seconds at full size) before ready."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from serve_app.model.diffusers_generator import DiffusersGenerator


class RecordingPipe:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **call: Any) -> SimpleNamespace:
        self.calls.append(call)
        count = len(call["prompt"])
        return SimpleNamespace(images=torch.zeros(count, 3, call["height"], call["width"]))


def test_warmup_runs_one_step_per_size():
    pipe = RecordingPipe()
    generator = DiffusersGenerator(pipe, device="cpu", dtype=torch.float32, info={})
    generator.warmup(["64x32", "32x64"])
    assert [(c["width"], c["height"], c["num_inference_steps"], c["prompt"])
            for c in pipe.calls] == [(64, 32, 1, ["warm-up"]), (32, 64, 1, ["warm-up"])]
