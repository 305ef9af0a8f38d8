"""The model replica: runs the batches the batching deployment hands it, one at a time.

`max_ongoing_requests: 1` (app.py): a replica takes a batch only when it can start it, so
the batcher's queue, not the replica's, is where calls wait and batches grow. torch and
diffusers are imported inside the replica only (by the generator factory), so importing
this module to build the application stays light.

Several models (config `model:` and `models:`): each batch is of one model, named by the
batcher as the request's multiplexed model id. The replica holds up to
max_models_per_replica models through Ray Serve's model multiplexing (`get_model`,
decorated with `@serve.multiplexed` when the replica starts), which evicts the least
recently used and tells the router which models each replica holds, so a batch goes to a
replica that has its model where one is free. A memory budget (replica.models_memory_gib)
evicts by size too (serve_app/ray_compat.py). The default model is loaded and warmed before
the replica reports ready.
"""

from __future__ import annotations

import asyncio
import gc
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
from serve_app.model.models import HeldModels, LoadedModel, load_model_generator
from serve_app.model.step_progress import LatestValueWriter
from serve_app.protocol import BACKLOG_METRIC, GenerationItem, ModelBatch, ModelResult
from serve_app.ray_compat import evict_least_recently_used
from serve_app.store import ImageStore, preview_record_name, step_record_name
from serve_app.tee import check_tee

logger = logging.getLogger("ray.serve")

BATCH_HISTORY = 256


@serve.deployment(name="Text2ImageModel")
class Text2ImageModel:
    # async: the default model loads through the multiplexed loader (an await) before the
    # replica reports ready; Ray Serve awaits an async constructor.
    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        self.config = AppConfig.model_validate(config)
        security = self.config.security
        # Prompts and pixels pass through here: in confidential mode this process must be in
        # a TEE. None is kept past the call that needs it (stats() has no prompts).
        self._tee = check_tee(security.require_tee, security.tee_probe)
        # It writes previews and step counts to the store (no broker here).
        confidential.check(self.config)
        started = time.perf_counter()
        self._models = self.config.resolved_models()
        self._default = self.config.default_model_id
        # One worker thread: pipeline calls (and model loads) run one at a time, off the
        # event loop, so the replica still answers info() and health checks meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._batch_sizes: deque[int] = deque(maxlen=BATCH_HISTORY)
        self._pipeline_calls = 0
        # (width, height, steps) of each call, per batch: what the batcher handed over.
        self._batch_shapes: deque[list[tuple[int, int, int]]] = deque(maxlen=BATCH_HISTORY)
        # The model id of each batch, in order.
        self._batch_models: deque[str] = deque(maxlen=BATCH_HISTORY)
        self._progress: LatestValueWriter | None = None
        self._metrics = ModelMetrics()
        # Calls waiting in the batcher when this replica last took a batch (autoscaling).
        self._backlog = 0
        self._held = HeldModels(self.config.replica.models_memory_gib)
        self._loads: dict[str, int] = {}
        self._evictions: dict[str, int] = {}
        # Per loaded model, what it runs on (backend, dtype): /readyz, /v1/models.
        self._model_info: dict[str, dict[str, Any]] = {}
        # The replica's info (/readyz): the first model it loaded, the default one.
        self._info: dict[str, Any] = {}

        async def load(model_id: str) -> LoadedModel:
            return await self._load(model_id)
        # Decorated here, not on the class: the count comes from the config.
        self.get_model = serve.multiplexed(
            max_num_models_per_replica=self.config.max_models_per_replica)(load)
        await self.get_model(self._default)
        logger.info("model replica ready in %.2fs: %s", time.perf_counter() - started,
                    self._info)

    async def _load(self, model_id: str) -> LoadedModel:
        """Loads a model (Ray's multiplexer calls this on a miss, after its own count limit
        has evicted one): first makes room under the memory budget, evicting the least
        recently used models."""
        model = self._models[model_id]
        need = model.estimated_memory_gib(self._resolved_dtype(model_id))
        evicted = False
        while len(self._held) and not self._held.fits(need):
            gone = await evict_least_recently_used(self.get_model)
            if gone is None:
                break  # Ray's internals moved (logged): only the count limit holds
            evicted = True
        if evicted or self._evictions:
            # Pipelines hold reference cycles: free the evicted ones before loading another.
            gc.collect()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        generator = await loop.run_in_executor(self._executor, load_model_generator,
                                               self.config, model_id)
        seconds = time.perf_counter() - started
        info = generator.info
        if not self._info:
            info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
            info["tee"] = self._tee
            self._info = info
        self._model_info[model_id] = {"backend": info.get("backend"),
                                      "dtype": info.get("dtype")}
        self._held.add(model_id, model.estimated_memory_gib(
            str(info.get("dtype")), unet=(info.get("parts") or {}).get("unet")))
        self._loads[model_id] = self._loads.get(model_id, 0) + 1
        self._metrics.record_load(model_id, seconds)
        logger.info("model %s loaded in %.2fs; holding %s", model_id, seconds,
                    self._held.snapshot())
        return LoadedModel(model_id, generator, self._evicted)

    def _evicted(self, model_id: str) -> None:
        """LoadedModel.__del__: Ray's multiplexer evicted the model (count limit or memory
        budget). Called in a worker thread."""
        if self._held.remove(model_id):
            self._evictions[model_id] = self._evictions.get(model_id, 0) + 1
            self._model_info.pop(model_id, None)
            self._metrics.record_eviction(model_id)
            logger.info("model %s evicted; holding %s", model_id, self._held.snapshot())

    def _resolved_dtype(self, model_id: str) -> str:
        """The dtype a model will load in, for its memory estimate before it loads: its
        configured one, or for `auto` what `auto` chose for the default model here."""
        dtype = self._models[model_id].dtype
        if dtype != "auto":
            return dtype
        return str(self._info.get("dtype") or "float32")

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
        step's preview of the call's first image, as a small PNG written like the steps,
        one record per step (the stream sends every step's own preview)."""
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
                progress.submit(preview_record_name(key, index, step),
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
        """The replica's info (its first model's, the default), and which models it holds
        now with what they run on."""
        return {**self._info,
                "models_loaded": {model_id: dict(self._model_info.get(model_id, {}))
                                  for model_id in self._held.ids()}}

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self._batch_sizes), "pipeline_calls": self._pipeline_calls,
                "batch_shapes": list(self._batch_shapes),
                "batch_models": list(self._batch_models), "loads": dict(self._loads),
                "evictions": dict(self._evictions), **self._held.snapshot()}

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
        model_id = serve.get_multiplexed_model_id() or self._default
        self._batch_sizes.append(len(items))
        self._batch_shapes.append([item.shape_key for item in items])
        self._batch_models.append(model_id)
        if model_id not in self._models or any(
                (item.model or self._default) != model_id for item in items):
            # The batcher names the batch's model; a call of another model never runs here.
            self._backlog = 0
            return [ModelResult(error="model_mismatch") for _ in items]
        generator = await self._generator_of(model_id)
        if generator is None:
            self._backlog = 0
            return [ModelResult(error="model_unavailable",
                                message=f"model {model_id!r} could not be loaded")
                    for _ in items]
        groups = plan_pipeline_calls(items, self.config.batching.max_images_per_call)
        results: list[list[ModelResult]] = []
        for group in groups:
            results.append(await self._run_group(generator, [items[i] for i in group.indices],
                                                 group.key, len(items)))
        # Idle until the next batch: nothing is waiting for this replica.
        self._backlog = 0
        return scatter(groups, results, len(items))

    async def _generator_of(self, model_id: str) -> ImageGenerator | None:
        """The model's generator, loaded (and others evicted) if this replica does not hold
        it; None when it cannot be loaded (logged with the reason)."""
        for _ in range(2):
            try:
                loaded: LoadedModel = await self.get_model(model_id)
            except Exception as exc:
                logger.error("model %s could not be loaded: %s: %s", model_id,
                             type(exc).__name__, exc)
                return None
            # None: evicted between Ray's answer and now (another batch's load, with
            # max_ongoing_requests > 1): ask again, which loads it again.
            if loaded.generator is not None:
                return loaded.generator
        return None

    async def _run_group(self, generator: ImageGenerator, members: list[GenerationItem],
                         key: Any, batch_size: int) -> list[ModelResult]:
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
        previews = self._preview_reporter(run)
        try:
            images = await loop.run_in_executor(
                self._executor, generator.generate, run, self._step_reporter(run),
                previews, init_images)
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
        if previews is not None:
            # A stream sends its last steps when the result comes: their previews must be
            # in the store by then (this waits for the queued writes only).
            await loop.run_in_executor(None, self._writer().drain)
        first = run[0]
        self._metrics.record_pipeline_call(first.width, first.height, first.steps,
                                           sum(m.count for m in run), elapsed)
        for i, imgs in zip(running, images):
            out[i] = ModelResult(images=imgs, pipeline_s=elapsed, batch_size=batch_size)
        return [r for r in out if r is not None]
