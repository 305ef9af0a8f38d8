"""Batching policy as plain functions: group calls by shape, scatter results back.

A diffusers pipeline call runs one (width, height, steps) shape, so a Serve batch holding
mixed shapes becomes one pipeline call per shape. Nothing here imports Ray or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


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

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.steps)

    def image_seeds(self) -> list[int]:
        return [image_seed(self.seed, self.call_index, j) for j in range(self.count)]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationItem:
        return cls(**data)


@dataclass(frozen=True)
class ShapeGroup:
    key: tuple[int, int, int]
    indices: tuple[int, ...]


def image_seed(seed: int, call_index: int, image_index: int) -> int:
    """A per-image seed that does not collide between neighbouring request seeds."""
    state = np.random.SeedSequence([seed, call_index, image_index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def group_by_shape(items: Sequence[GenerationItem]) -> list[ShapeGroup]:
    """Groups in order of first arrival, so the oldest request's shape runs first."""
    order: dict[tuple[int, int, int], list[int]] = {}
    for index, item in enumerate(items):
        order.setdefault(item.shape_key, []).append(index)
    return [ShapeGroup(key, tuple(indices)) for key, indices in order.items()]


def split_by_images(group: ShapeGroup, items: Sequence[GenerationItem],
                    max_images: int) -> list[ShapeGroup]:
    """Cut a shape group into runs of at most `max_images` images, keeping order. An item
    larger than the cap runs alone (requests are validated against it up front)."""
    chunks: list[ShapeGroup] = []
    current: list[int] = []
    images = 0
    for index in group.indices:
        count = items[index].count
        if current and images + count > max_images:
            chunks.append(ShapeGroup(group.key, tuple(current)))
            current, images = [], 0
        current.append(index)
        images += count
    if current:
        chunks.append(ShapeGroup(group.key, tuple(current)))
    return chunks


def plan_pipeline_calls(items: Sequence[GenerationItem], max_images: int) -> list[ShapeGroup]:
    """The pipeline calls for one Serve batch: by shape, then by the image cap."""
    return [chunk for group in group_by_shape(items)
            for chunk in split_by_images(group, items, max_images)]


def scatter(groups: Sequence[ShapeGroup], group_results: Sequence[Sequence[T]],
            total: int) -> list[T]:
    """Put each group's per-item results back at the items' original positions."""
    if len(groups) != len(group_results):
        raise ValueError(f"{len(groups)} groups but {len(group_results)} results")
    out: list[T | None] = [None] * total
    for group, results in zip(groups, group_results):
        if len(results) != len(group.indices):
            raise ValueError(
                f"group {group.key} has {len(group.indices)} items but {len(results)} results"
            )
        for index, result in zip(group.indices, results):
            out[index] = result
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        raise ValueError(f"no result for items {missing}")
    return out  # type: ignore[return-value]


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
