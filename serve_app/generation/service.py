"""Text-to-image as a plain service: plan the model calls, send them through the batching
deployment, encode and store the PNGs, and build the response body.

No HTTP and no Ray here: the ingress's routes call it with a Serve handle to the batcher,
and tests call it with a fake one (anything with `generate.remote(call)` returning an
awaitable ModelResult) and an in-memory store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError

from serve_app.config import AppConfig
from serve_app.errors import (
    GenerationFailed,
    GenerationTimeout,
    InvalidImage,
    ModelUnavailable,
    NotSupported,
    Overloaded,
    ReplicaLost,
)
from serve_app.generation.models import catalog_of
from serve_app.generation.requests import new_request_id, plan_calls, seed_of
from serve_app.generation.schemas import (
    Image2ImageRequest,
    Image2ImageResponse,
    Text2ImageRequest,
    Text2ImageResponse,
)
from serve_app.imaging import encode_png, make_grid
from serve_app.metrics import record_encode
from serve_app.protocol import GenerationItem, ModelResult, Priority
from serve_app.store import GRID_NAME, ImageStore, image_name

logger = logging.getLogger("ray.serve")

# A call whose batcher replica died is sent again (a model replica's death is handled in
# the batcher): seeded generation is idempotent, so the client gets its images.
REPLICA_LOST_RETRIES = 2


class GenerationService:
    def __init__(self, batcher: Any, store: ImageStore, config: AppConfig) -> None:
        self.batcher = batcher
        self.store = store
        self.config = config

    async def generate(self, body: Text2ImageRequest, request_id: str | None = None,
                        seed: int | None = None, base_url: str = "",
                        on_call_done: Callable[[int], None] | None = None,
                        progress_key: str | None = None,
                        timings: dict[str, float] | None = None,
                        priority: Priority = "interactive",
                        preview: bool = False) -> dict[str, Any]:
        """timings, when given, receives where the time went (seconds): `pipeline` (the
        longest pipeline call inside a model replica), `model` (model calls as the ingress
        saw them: queue, hops, pipeline), `store` (PNG encoding and storage). `preview`
        (with a progress_key) has the model replicas write a preview per step.
        request_id and seed: a new id, and the body's seed or a random one, unless given."""
        request_id = request_id if request_id is not None else new_request_id()
        seed = seed if seed is not None else seed_of(body)
        # Resolved here too: a job queued before an upgrade names none (the default), one
        # queued for a model since removed from the config fails as the client's error.
        catalog = catalog_of(self.config)
        model_id = catalog.resolve(body.model)
        items = plan_calls(body, seed, progress_key, priority, preview, model=model_id)
        started = time.perf_counter()
        results = await self._run_calls(items, request_id, on_call_done)
        generation_s = time.perf_counter() - started

        images = [result.images for result, _ in results]
        stored = time.perf_counter()
        await self._store_images(request_id, images)
        if timings is not None:
            timings["pipeline"] = max(result.pipeline_s for result, _ in results)
            timings["model"] = generation_s
            timings["store"] = time.perf_counter() - stored
        base = f"{base_url}/images/{request_id}"
        output = [
            {"latencySeconds": round(latency_s, 4), "url": f"{base}/{image_name(i, j)}"}
            for i, (result, latency_s) in enumerate(results)
            for j in range(len(result.images))
        ]
        total = len(output)
        logger.info("request %s: %d images %s %d steps of model %s in %.3fs", request_id,
                    total, body.size, body.step, model_id, generation_s)
        meta: dict[str, Any] = {
            "batch": body.batch, "model": catalog.models[model_id].source,
            "modelId": model_id, "number": body.number,
            "prompt": body.prompt, "size": body.size, "step": body.step, "seed": seed,
        }
        response: type[Text2ImageResponse] = Text2ImageResponse
        if isinstance(body, Image2ImageRequest):
            meta["strength"], response = body.strength, Image2ImageResponse
        return response.model_validate({
            "id": request_id,
            "averageImageGenerationTimeSeconds": round(generation_s / total, 4),
            "generationTimeSeconds": round(generation_s, 4),
            "meta": {"input": meta},
            "output": output,
            "gridUrl": f"{base}/{GRID_NAME}" if body.number > 1 else None,
            "status": "success",
        }).model_dump()

    async def _run_calls(self, items: list[GenerationItem], request_id: str,
                         on_call_done: Callable[[int], None] | None = None,
                         ) -> list[tuple[ModelResult, float]]:
        """Each call's result and its latency as the ingress saw it (seconds)."""
        async def one(item: GenerationItem) -> tuple[ModelResult, float]:
            start = time.perf_counter()
            for attempt in range(REPLICA_LOST_RETRIES + 1):
                try:
                    result: ModelResult = await self.batcher.generate.remote(item)
                    break
                except (RayActorError, ActorUnavailableError):
                    # The batcher replica died with the call (a model replica's death is
                    # handled in the batcher, which queues the batch again).
                    if attempt == REPLICA_LOST_RETRIES:
                        raise ReplicaLost("the batching replica was lost; send again later",
                                          retry_after_s=self.config.ingress.retry_after_s,
                                          request_id=request_id) from None
                    logger.warning("request %s: batcher replica lost, retrying call %d",
                                   request_id, item.call_index)
            if result.error == "overloaded":
                raise Overloaded("all model replicas are busy and the batching queue is full",
                                 retry_after_s=self.config.ingress.retry_after_s,
                                 request_id=request_id)
            if result.error == "replica_lost":
                # Lost with REPLICA_LOST_ATTEMPTS model replicas in a row (their node went
                # away): not the request's fault, and not a pipeline error.
                raise ReplicaLost("the model replica was lost; send again later",
                                  retry_after_s=self.config.ingress.retry_after_s,
                                  request_id=request_id)
            if on_call_done is not None and result.error is None:
                on_call_done(len(result.images))
            return result, time.perf_counter() - start

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks),
                                             self.config.ingress.request_timeout_s)
        except asyncio.TimeoutError:
            raise GenerationTimeout(
                f"generation took longer than {self.config.ingress.request_timeout_s}s",
                retry_after_s=self.config.ingress.retry_after_s, request_id=request_id) from None
        except (Overloaded, ReplicaLost):
            for task in tasks:
                task.cancel()  # the request's other calls give their places back
            raise
        except Exception as exc:
            for task in tasks:
                task.cancel()
            logger.error("request %s: model call failed: %s", request_id, type(exc).__name__)
            raise GenerationFailed("image generation failed", request_id=request_id) from None
        for result, _ in results:
            # The client's own errors first: they are 4xx, whatever else failed.
            if result.error == "invalid_image":
                raise InvalidImage(result.message or "image does not decode", field="image",
                                   request_id=request_id)
            if result.error == "not_supported":
                raise NotSupported(result.message or "not supported by this backend",
                                   request_id=request_id)
            if result.error == "model_unavailable":
                raise ModelUnavailable(result.message or "the model could not be loaded",
                                       request_id=request_id)
        for result, _ in results:
            if result.error is not None:
                logger.error("request %s: pipeline error %s", request_id, result.error)
                raise GenerationFailed("image generation failed", request_id=request_id)
        return results

    async def _store_images(self, request_id: str, images: list[list[Any]]) -> None:
        def encode_and_put(name: str, pixels: Any) -> None:
            start = time.perf_counter()
            data = encode_png(pixels)
            record_encode("grid" if name == GRID_NAME else "image",
                          time.perf_counter() - start)
            self.store.put(request_id, name, data)

        jobs = [
            asyncio.to_thread(encode_and_put, image_name(i, j), pixels)
            for i, call_images in enumerate(images)
            for j, pixels in enumerate(call_images)
        ]
        if len(images) > 1:
            flat = [pixels for call_images in images for pixels in call_images]
            jobs.append(asyncio.to_thread(lambda: encode_and_put(GRID_NAME, make_grid(flat))))
        await asyncio.gather(*jobs)
