"""Batching policy as plain functions: group calls by shape, scatter results back.

A diffusers pipeline call runs one kind (text- or image-to-image) and one (width, height,
steps) shape (and one strength), so a batch holding mixed keys becomes one pipeline call per
key. Nothing here imports Ray or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from serve_app.protocol import BatchKey, GenerationItem

T = TypeVar("T")


@dataclass(frozen=True)
class ShapeGroup:
    key: BatchKey
    indices: tuple[int, ...]


def group_by_shape(items: Sequence[GenerationItem]) -> list[ShapeGroup]:
    """Groups in order of first arrival, so the oldest request's shape runs first."""
    order: dict[BatchKey, list[int]] = {}
    for index, item in enumerate(items):
        order.setdefault(item.batch_key, []).append(index)
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
