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

from serve_app.batching.autoscaling import BACKLOG_METRIC
from serve_app.batching.policy import plan_pipeline_calls, scatter
from serve_app.config import AppConfig
from serve_app.jobs.records import step_record_name
from serve_app.metrics import ModelMetrics
from serve_app.model.generator import ImageGenerator, load_factory
from serve_app.model.step_progress import LatestValueWriter
from serve_app.protocol import GenerationItem, ModelBatch, ModelResult
from serve_app.store import ImageStore
from serve_app.tee import check_tee

logger = logging.getLogger("ray.serve")

BATCH_HISTORY = 256


@serve.deployment(name="Text2ImageModel")
class Text2ImageModel:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        security = self.config.security
        # Prompts and pixels live here: in confidential mode this process must be in a TEE.
        tee = check_tee(security.require_tee, security.tee_probe)
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
        self._prompts: deque[str] = deque(maxlen=BATCH_HISTORY)
        # (width, height, steps) of each call, per batch: what the batcher handed over.
        self._batch_shapes: deque[list[tuple[int, int, int]]] = deque(maxlen=BATCH_HISTORY)
        self._progress: LatestValueWriter | None = None
        self._metrics = ModelMetrics()
        # Calls waiting in the batcher when this replica last took a batch (autoscaling).
        self._backlog = 0
        logger.info("model replica ready in %.2fs: %s", time.perf_counter() - started,
                    self.generator.info)

    def _step_reporter(self, members: list[GenerationItem]) -> Callable[[int], None] | None:
        """For async jobs: denoising steps done, written to the store off the pipeline
        thread (an object-store PUT must not stall the step loop)."""
        keyed = [(m.progress_key, m.call_index) for m in members if m.progress_key]
        if not keyed:
            return None
        if self._progress is None:
            store = self.config.store
            assert store.url is not None  # AppConfig fills in the per-application default
            self._progress = LatestValueWriter(
                ImageStore(store.url, store.storage_options).put_record)
        progress = self._progress

        def report(step: int) -> None:
            for key, index in keyed:
                progress.submit(step_record_name(key, index), str(step).encode())
        return report

    def info(self) -> dict[str, Any]:
        return dict(self.generator.info)

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self._batch_sizes), "pipeline_calls": self._pipeline_calls,
                "prompts": list(self._prompts), "batch_shapes": list(self._batch_shapes)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metric (batching/autoscaling.py): the batcher's backlog when
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
        self._prompts.extend(item.prompt for item in items)
        self._batch_shapes.append([item.shape_key for item in items])
        loop = asyncio.get_running_loop()
        groups = plan_pipeline_calls(items, self.config.batching.max_images_per_call)
        results: list[list[ModelResult]] = []
        for group in groups:
            members = [items[i] for i in group.indices]
            start = time.perf_counter()
            self._pipeline_calls += 1
            on_step = self._step_reporter(members)
            try:
                images = await loop.run_in_executor(self._executor, self.generator.generate,
                                                    members, on_step)
            except Exception as exc:
                # One shape failing must not fail the other shapes in the batch.
                logger.exception("pipeline call failed for shape %s", group.key)
                results.append([ModelResult(error=type(exc).__name__) for _ in members])
                continue
            elapsed = time.perf_counter() - start
            first = members[0]
            self._metrics.record_pipeline_call(first.width, first.height, first.steps,
                                               sum(m.count for m in members), elapsed)
            results.append([ModelResult(images=imgs, pipeline_s=elapsed, batch_size=len(items))
                            for imgs in images])
        # Idle until the next batch: nothing is waiting for this replica.
        self._backlog = 0
        return scatter(groups, results, len(items))
