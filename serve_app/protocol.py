"""The types that cross deployments: what the ingress asks of a model replica, and what
comes back. Plain dataclasses, pickled by Ray; no torch, so every side may import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

T = TypeVar("T")
# Interactive calls (/api/text2image) go before async-job calls in the batching deployment.
Priority = Literal["interactive", "job"]


@dataclass(frozen=True)
class GenerationItem:
    """One model call: a prompt and `count` images of one shape."""

    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    # Index of this call within its request: separates the seeds of calls 0..number-1.
    call_index: int = 0
    count: int = 1
    # Set for async jobs: the replica records denoising steps done under this key.
    progress_key: str | None = None
    priority: Priority = "interactive"

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.steps)

    def image_seeds(self) -> list[int]:
        return [image_seed(self.seed, self.call_index, j) for j in range(self.count)]



@dataclass(frozen=True)
class ModelBatch:
    """What the batching deployment hands a model replica: calls of one shape, run as one
    pipeline call (split only if over the image cap)."""

    calls: tuple[GenerationItem, ...]
    # Calls still waiting in the batcher when this batch left: the replicas report it to
    # the autoscaler, which scales on backlog as well as on ongoing batches.
    backlog: int = 0


@dataclass
class ModelResult:
    """One call's outcome: `count` HxWx3 uint8 images, or an error code (never a trace)."""

    images: list[np.ndarray] = field(default_factory=list)
    # The pipeline call this call ran in, inside the replica (Server-Timing `pipeline`).
    pipeline_s: float = 0.0
    # Calls in the batch this call ran in.
    batch_size: int = 0
    error: str | None = None


def image_seed(seed: int, call_index: int, image_index: int) -> int:
    """A per-image seed that does not collide between neighbouring request seeds."""
    state = np.random.SeedSequence([seed, call_index, image_index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def flatten_group(items: Sequence[GenerationItem]) -> tuple[list[str], list[int]]:
    """A group's prompts and seeds, one entry per image, as the pipeline takes them."""
    prompts: list[str] = []
    seeds: list[int] = []
    for item in items:
        prompts.extend([item.prompt] * item.count)
        seeds.extend(item.image_seeds())
    return prompts, seeds


def split_images(items: Sequence[GenerationItem], images: Sequence[T]) -> list[list[T]]:
    """Inverse of flatten_group: per-item lists of that item's images."""
    expected = sum(item.count for item in items)
    if len(images) != expected:
        raise ValueError(f"expected {expected} images, got {len(images)}")
    out: list[list[T]] = []
    start = 0
    for item in items:
        out.append(list(images[start:start + item.count]))
        start += item.count
    return out
