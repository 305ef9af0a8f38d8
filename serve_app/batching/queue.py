"""The batching deployment's queue: which waiting calls run together, and in what order.

Plain Python (no Ray, no asyncio beyond futures), so the order rules are tested directly:

* A batch holds calls of one model (each its own pipeline, on a replica that holds it), one
  kind (text-to-image or image-to-image, which run different
  pipelines; image-to-image also of one strength), one shape (width, height, steps) and
  one priority class, at most
  `max_batch_size` calls, `max_images_per_call` images and `max_batch_image_steps` of work
  (a single call over a cap runs alone: requests are validated against the image cap).
* Interactive calls go before async-job calls. A job call that has waited
  `job_max_wait_s` is served as if interactive, so a steady interactive stream cannot
  starve jobs for ever.
* Within a class the models take turns (round robin: the model served longest ago that
  has calls of the class waiting goes next), so a burst for one model does not starve
  another. Within a model the batch is built around its oldest waiting call (first come,
  first served across shapes), and takes that shape's other calls in arrival order: no
  shape and no call waits behind later arrivals of its class and model.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.config import BatchingConfig
from serve_app.protocol import GenerationItem, ModelResult

CLASSES = ("interactive", "job")
# The model tag of calls that name none (the ingress always names one; a job queued before
# models existed may not).
DEFAULT_MODEL_TAG = "default"


class QueueFull(Exception):
    """More calls are waiting than the batcher takes (replica.max_queued_requests)."""


@dataclass(eq=False)
class Pending:
    call: GenerationItem
    arrived: float
    seq: int
    future: asyncio.Future[ModelResult]
    # Times its batch was lost with a model replica and the call was queued again.
    attempts: int = 0

    @property
    def images(self) -> int:
        return self.call.count

    @property
    def work(self) -> float:
        """512x512 image-steps: what the call costs a CPU replica (image-to-image runs
        only its denoising steps; its VAE encode costs about one step more)."""
        call = self.call
        steps = call.denoising_steps + (1 if call.kind == "img2img" else 0)
        return call.count * steps * call.width * call.height / (512 * 512)


@dataclass
class BatchQueue:
    config: BatchingConfig
    max_waiting: int
    # A job call waiting this long is served at interactive priority.
    job_max_wait_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _waiting: list[Pending] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)
    # Models in the order they take turns: the one served longest ago first (a model seen
    # for the first time joins at the end).
    _turns: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, call: GenerationItem, future: asyncio.Future[ModelResult]) -> Pending:
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self._waiting)} calls waiting")
        pending = Pending(call, self.clock(), next(self._seq), future)
        self._waiting.append(pending)
        if call.model not in self._turns:
            self._turns.append(call.model)
        return pending

    def oldest_arrival(self) -> float | None:
        return min((p.arrived for p in self._waiting), default=None)

    def remove(self, pending: Pending) -> bool:
        """Take a call out before its batch started (its client left). False if gone."""
        try:
            self._waiting.remove(pending)
        except ValueError:
            return False
        return True

    def requeue(self, batch: list[Pending]) -> None:
        """Calls whose batch was lost (model replica died) wait again in their original
        place: they keep their arrival order and priority."""
        for pending in batch:
            pending.attempts += 1
        self._waiting.extend(batch)
        self._waiting.sort(key=lambda p: p.seq)

    def _effective_class(self, pending: Pending, now: float) -> int:
        if pending.call.priority == "job" and now - pending.arrived < self.job_max_wait_s:
            return 1
        return 0

    def next_batch(self) -> list[Pending]:
        """The calls to run next (removed from the queue); empty when none wait."""
        if not self._waiting:
            return []
        now = self.clock()
        lead_class = min(self._effective_class(p, now) for p in self._waiting)
        urgent = [p for p in self._waiting if self._effective_class(p, now) == lead_class]
        # The model whose turn it is, among those with calls of the most urgent class.
        waiting_models = {p.call.model for p in urgent}
        model = next(m for m in self._turns if m in waiting_models)
        self._turns.remove(model)
        self._turns.append(model)
        # Its oldest call of that class leads; the list is in arrival order.
        lead = next(p for p in urgent if p.call.model == model)
        batch = [lead]
        images, work = lead.images, lead.work
        for pending in urgent:
            if len(batch) >= self.config.max_batch_size:
                break
            if (pending is lead or pending.call.model != model
                    or pending.call.batch_key != lead.call.batch_key):
                continue
            if (images + pending.images > self.config.max_images_per_call
                    or work + pending.work > self.config.max_batch_image_steps):
                continue
            batch.append(pending)
            images += pending.images
            work += pending.work
        batch.sort(key=lambda p: p.seq)
        taken = set(map(id, batch))
        self._waiting = [p for p in self._waiting if id(p) not in taken]
        return batch

    def depth(self) -> dict[tuple[str, str], int]:
        """Waiting calls by (class, "WxH/steps"), for the queue-depth gauge; image-to-image
        shapes end in "/img2img"."""
        counts: dict[tuple[str, str], int] = {}
        for pending in self._waiting:
            call = pending.call
            suffix = "/img2img" if call.kind == "img2img" else ""
            key = (call.priority, f"{call.width}x{call.height}/{call.steps}{suffix}")
            counts[key] = counts.get(key, 0) + 1
        return counts

    def depth_by_model(self) -> dict[tuple[str, str], int]:
        """Waiting calls by (class, model id), for the per-model queue-depth gauge; the
        default model's calls (model None) count under `default`."""
        counts: dict[tuple[str, str], int] = {}
        for pending in self._waiting:
            key = (pending.call.priority, pending.call.model or DEFAULT_MODEL_TAG)
            counts[key] = counts.get(key, 0) + 1
        return counts
