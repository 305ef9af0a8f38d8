"""CPU speed levers applied after load. Each is switched by model.optimization."""

from __future__ import annotations

import logging
from typing import Any

import torch

from serve_app.config import OptimizationConfig

logger = logging.getLogger(__name__)


def optimize_pipeline(pipe: Any, options: OptimizationConfig) -> list[str]:
    applied: list[str] = []
    if options.channels_last:
        for name in ("unet", "vae"):
            getattr(pipe, name).to(memory_format=torch.channels_last)
        applied.append("channels_last")
    return applied
