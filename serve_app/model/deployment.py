"""The model replica: a Ray Serve deployment that batches calls into pipeline runs.

torch and diffusers are imported inside the replica only (by the generator factory), so
importing this module to build the application stays light.
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

from serve_app.batching.policy import plan_pipeline_calls, scatter
from serve_app.config import AppConfig, BatchingConfig
from serve_app.jobs.records import step_record_name
from serve_app.metrics import ModelMetrics
from serve_app.model.generator import ImageGenerator, load_factory
from serve_app.model.step_progress import LatestValueWriter
from serve_app.protocol import GenerationItem, ModelResult
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
        # replica keeps accepting calls (which queue up into the next batch) meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._batch_sizes: deque[int] = deque(maxlen=BATCH_HISTORY)
        self._pipeline_calls = 0
        self._progress: LatestValueWriter | None = None
        # Until Serve calls reconfigure() with the deployment's user_config.
        self._batching = self.config.batching
        self._metrics = ModelMetrics()
        # id(call) -> when it reached this replica, for the queue-wait metric.
        self._arrivals: dict[int, float] = {}
        logger.info("model replica ready in %.2fs: %s", time.perf_counter() - started,
                    self.generator.info)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        batching = BatchingConfig.model_validate(user_config)
        self._batching = batching
        self._generate_batch.set_max_batch_size(batching.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        logger.info("batching set to %s", batching.model_dump())

    def _step_reporter(self, members: list[GenerationItem]) -> Callable[[int], None] | None:
        """For async jobs: denoising steps done, written to the store off the pipeline
        thread (an object-store PUT must not stall the step loop)."""
        keyed = [m for m in members if m.progress_key]
        if not keyed:
            return None
        if self._progress is None:
            store = self.config.store
            self._progress = LatestValueWriter(
                ImageStore(store.url, store.storage_options).put_record)
        progress = self._progress

        def report(step: int) -> None:
            for member in keyed:
                name = step_record_name(member.progress_key, member.call_index)
                progress.submit(name, str(step).encode())
        return report

    def info(self) -> dict[str, Any]:
        return dict(self.generator.info)

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self._batch_sizes), "pipeline_calls": self._pipeline_calls,
                "batching": self._batching.model_dump()}

    async def generate(self, call: GenerationItem) -> ModelResult:
        """One call: `count` images of one prompt, as HxWx3 uint8 arrays."""
        self._arrivals[id(call)] = time.perf_counter()
        try:
            return await self._generate_batch(call)
        finally:
            self._arrivals.pop(id(call), None)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0)
    async def _generate_batch(self, items: list[GenerationItem]) -> list[ModelResult]:
        self._batch_sizes.append(len(items))
        now = time.perf_counter()
        self._metrics.record_batch(len(items),
                                   [now - self._arrivals.get(id(it), now) for it in items])
        loop = asyncio.get_running_loop()
        groups = plan_pipeline_calls(items, self._batching.max_images_per_call)
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
        return scatter(groups, results, len(items))
