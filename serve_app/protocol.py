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
# Text-to-image, or image-to-image from an input image: separate pipelines, never one batch.
Kind = Literal["txt2img", "img2img"]
# (kind, width, height, steps, strength): calls that may share one pipeline call.
BatchKey = tuple[str, int, int, int, float]
# The custom autoscaling metric model replicas report (the batcher's backlog, in batches)
# and the model deployment's policy reads (serve_app.batching.autoscaling).
BACKLOG_METRIC = "backlog_batches"


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
    # Image-to-image: the encoded input image (PNG or JPEG as uploaded; its header was
    # checked by the ingress, the model replica decodes it under the same limits).
    init_image: bytes | None = None
    # Image-to-image: how far the input is noised (1.0: nothing of it is kept). Runs about
    # steps x strength denoising steps (denoising_steps), at least 1 (the ingress checks it).
    strength: float = 1.0
    # Write a small preview image per denoising step beside the step count (only when a
    # client watches: it costs the replica a projection and a tiny PNG per step).
    preview: bool = False
    # The model's id (config: model.id, models[].id); None: the default model. Calls of
    # different models never share a batch: they run on different pipelines.
    model: str | None = None

    @property
    def kind(self) -> Kind:
        return "txt2img" if self.init_image is None else "img2img"

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.steps)

    @property
    def batch_key(self) -> BatchKey:
        """Calls with equal keys can run in one pipeline call: same pipeline, same shape,
        and (image-to-image) the same strength, which diffusers takes per call."""
        strength = self.strength if self.init_image is not None else 1.0
        return (self.kind, self.width, self.height, self.steps, strength)

    @property
    def denoising_steps(self) -> int:
        """Steps the pipeline actually runs (image-to-image skips the first ones)."""
        if self.init_image is None:
            return self.steps
        return denoising_steps(self.steps, self.strength)

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
    # A message safe to show the client, for errors that are the client's (invalid_image,
    # not_supported); never a trace.
    message: str | None = None


def denoising_steps(steps: int, strength: float) -> int:
    """The steps diffusers' image-to-image runs for `steps` at `strength`: it skips the
    first int(steps - steps x strength) of the schedule (StableDiffusionXLImg2ImgPipeline
    .get_timesteps)."""
    return steps - int(max(steps - steps * strength, 0.0))


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
