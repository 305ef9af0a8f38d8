"""The model replica: runs the batches the batching deployment hands it, one at a time.

`max_ongoing_requests: 1` (app.py): a replica takes a batch only when it can start it, so
the batcher's queue, not the replica's, is where calls wait and batches grow. torch and
diffusers are imported inside the replica only (by the generator factory), so importing
this module to build the application stays light.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from serve_app import confidential
from serve_app.config import AppConfig
from serve_app.imaging import encode_png
from serve_app.metrics import ModelMetrics
from serve_app.model.batch_plan import plan_pipeline_calls, scatter
from serve_app.model.generator import ImageGenerator, PreviewCallback
from serve_app.model.input_image import InvalidInputImage, decode_input_image
from serve_app.model.step_progress import LatestValueWriter
from serve_app.plugins import load_factory
from serve_app.protocol import BACKLOG_METRIC, GenerationItem, ModelBatch, ModelResult
from serve_app.store import ImageStore, preview_record_name, step_record_name
from serve_app.tee import check_tee

logger = logging.getLogger("ray.serve")

BATCH_HISTORY = 256


@serve.deployment(name="Text2ImageModel")
class Text2ImageModel:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        security = self.config.security
        # Prompts and pixels pass through here: in confidential mode this process must be in
        # a TEE. None is kept past the call that needs it (stats() has no prompts).
        tee = check_tee(security.require_tee, security.tee_probe)
        # It writes previews and step counts to the store (no broker here).
        confidential.check(self.config)
        started = time.perf_counter()
        factory = load_factory(self.config.model.generator)
        self.generator: ImageGenerator = factory(self.config)
        self.generator.info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        self.generator.info["tee"] = tee
        # One worker thread: pipeline calls run one at a time, off the event loop, so the
        # replica still answers info() and health checks while it generates.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._batch_sizes: deque[int] = deque(maxlen=BATCH_HISTORY)
        self._pipeline_calls = 0
        # (width, height, steps) of each call, per batch: what the batcher handed over.
        self._batch_shapes: deque[list[tuple[int, int, int]]] = deque(maxlen=BATCH_HISTORY)
        self._progress: LatestValueWriter | None = None
        self._metrics = ModelMetrics()
        # Calls waiting in the batcher when this replica last took a batch (autoscaling).
        self._backlog = 0
        logger.info("model replica ready in %.2fs: %s", time.perf_counter() - started,
                    self.generator.info)

    def _writer(self) -> LatestValueWriter:
        if self._progress is None:
            store = self.config.store
            assert store.url is not None  # AppConfig fills in the per-application default
            self._progress = LatestValueWriter(
                ImageStore(store.url, store.storage_options).put_record)
        return self._progress

    def _step_reporter(self, members: list[GenerationItem]) -> Callable[[int], None] | None:
        """For async jobs and streamed requests: denoising steps done, written to the store
        off the pipeline thread (an object-store PUT must not stall the step loop)."""
        keyed = [(m.progress_key, m.call_index) for m in members if m.progress_key]
        if not keyed:
            return None
        progress = self._writer()

        def report(step: int) -> None:
            for key, index in keyed:
                progress.submit(step_record_name(key, index), str(step).encode())
        return report

    def _preview_reporter(self, members: list[GenerationItem]) -> PreviewCallback | None:
        """Only when a member asked for previews (a client watches its stream): each
        step's preview of the call's first image, as a small PNG written like the steps.
        Written before the step count, so a reader that sees step n finds its preview."""
        wanted: list[tuple[str, int, int]] = []
        position = 0
        for member in members:
            if member.preview and member.progress_key:
                wanted.append((member.progress_key, member.call_index, position))
            position += member.count
        if not wanted:
            return None
        progress = self._writer()

        def report(step: int, previews: list[Any]) -> None:
            for key, index, first_image in wanted:
                progress.submit(preview_record_name(key, index),
                                encode_png(previews[first_image]))
        return report

    def _decode_inputs(self, members: list[GenerationItem]) -> tuple[list[Any], list[int]]:
        """Image-to-image inputs decoded and fitted (PIL, untrusted data: limits
        re-checked here); the positions of members whose input does not decode."""
        images: list[Any] = []
        bad: list[int] = []
        for i, member in enumerate(members):
            try:
                images.append(decode_input_image(member.init_image or b"", member.width,
                                                 member.height, self.config.limits))
            except InvalidInputImage:
                bad.append(i)
        return images, bad

    def info(self) -> dict[str, Any]:
        return dict(self.generator.info)

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self._batch_sizes), "pipeline_calls": self._pipeline_calls,
                "batch_shapes": list(self._batch_shapes)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metric (serve_app/batching/autoscaling.py): the batcher's backlog when
        this replica took the batch it is running; 0 while idle (with calls waiting, no
        replica stays idle)."""
        per_batch = self.config.batching.max_batch_size
        return {BACKLOG_METRIC: float(-(-self._backlog // per_batch))}

    async def run_batch(self, batch: ModelBatch) -> list[ModelResult]:
        """The batch's calls, in order: one pipeline call per shape and image cap (the
        batcher forms batches of one shape within the cap, so normally exactly one)."""
        items = list(batch.calls)
        self._backlog = batch.backlog
        self._batch_sizes.append(len(items))
        self._batch_shapes.append([item.shape_key for item in items])
        groups = plan_pipeline_calls(items, self.config.batching.max_images_per_call)
        results: list[list[ModelResult]] = []
        for group in groups:
            results.append(await self._run_group([items[i] for i in group.indices], group.key,
                                                 len(items)))
        # Idle until the next batch: nothing is waiting for this replica.
        self._backlog = 0
        return scatter(groups, results, len(items))

    async def _run_group(self, members: list[GenerationItem], key: Any,
                         batch_size: int) -> list[ModelResult]:
        """One pipeline call; per member its images or its error. A member whose input
        image does not decode gets `invalid_image`, and the others still run."""
        loop = asyncio.get_running_loop()
        out: list[ModelResult | None] = [None] * len(members)
        init_images = None
        if members[0].kind == "img2img":
            init_images, bad = await loop.run_in_executor(self._executor, self._decode_inputs,
                                                          members)
            for i in bad:
                out[i] = ModelResult(error="invalid_image",
                                     message="image data is truncated, corrupt or outside "
                                             "the limits")
            running = [i for i in range(len(members)) if i not in bad]
        else:
            running = list(range(len(members)))
        if not running:
            return [r for r in out if r is not None]
        run = [members[i] for i in running]
        start = time.perf_counter()
        self._pipeline_calls += 1
        try:
            images = await loop.run_in_executor(
                self._executor, self.generator.generate, run, self._step_reporter(run),
                self._preview_reporter(run), init_images)
        except NotImplementedError as exc:
            for i in running:
                out[i] = ModelResult(error="not_supported", message=str(exc))
            return [r for r in out if r is not None]
        except Exception as exc:
            # One shape failing must not fail the other shapes in the batch.
            logger.exception("pipeline call failed for %s", key)
            for i in running:
                out[i] = ModelResult(error=type(exc).__name__)
            return [r for r in out if r is not None]
        elapsed = time.perf_counter() - start
        first = run[0]
        self._metrics.record_pipeline_call(first.width, first.height, first.steps,
                                           sum(m.count for m in run), elapsed)
        for i, imgs in zip(running, images):
            out[i] = ModelResult(images=imgs, pipeline_s=elapsed, batch_size=batch_size)
        return [r for r in out if r is not None]
