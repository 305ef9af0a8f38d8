"""The request-batching deployment, between the ingress and the model replicas.

It holds the calls that wait for a model replica and forms the batches (rules in
queue.py). A model replica runs one batch at a time (`max_ongoing_requests: 1`), and a batch
is formed only when a replica can take it: while every replica is busy the waiting calls
grow into the next batches, in priority order, and a lone call on an idle service never
waits.

Each batch is of one model (queue.py): it goes to the model deployment with that model's
id as the multiplexed model id (`handle.options(multiplexed_model_id=...)`), so Ray's
router prefers a replica that already holds the model, and the replica loads it if none
does (serve_app/model/deployment.py).

A batch lost with its model replica is queued again in its place (up to
REPLICA_LOST_ATTEMPTS times per call). A call whose client left before its batch was formed
is dropped and counted. Batching settings are this deployment's `user_config`: they change
at runtime with no model reload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from serve_app.batching.queue import BatchQueue, Pending, QueueFull
from serve_app.config import AppConfig, BatchingConfig
from serve_app.metrics import BatcherMetrics
from serve_app.protocol import GenerationItem, ModelBatch, ModelResult
from serve_app.ray_compat import known_replicas, wait_assigned

logger = logging.getLogger("ray.serve")

REPLICA_LOST_ATTEMPTS = 3
BATCH_HISTORY = 256
REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


@serve.deployment(name="Batcher")
class Batcher:
    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        self._model = model
        # Per model id: the model handle with that multiplexed model id (sharing the
        # handle's router, so known_replicas(self._model) still counts the replicas).
        self._handles: dict[str, Any] = {}
        self._queue = BatchQueue(self.config.batching,
                                 max_waiting=self.config.replica.max_queued_requests,
                                 job_max_wait_s=self.config.batching.job_max_wait_s)
        self._metrics = BatcherMetrics()
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task] = set()
        # What tests and operators read back: recent batch sizes as formed, calls dropped.
        self._batch_sizes: deque[int] = deque(maxlen=BATCH_HISTORY)
        # The models of each batch's calls (one, always: queue.py never mixes them).
        self._batch_models: deque[list[str]] = deque(maxlen=BATCH_HISTORY)
        self._dropped = 0
        self._requeued = 0
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        batching = BatchingConfig.model_validate(user_config)
        self._queue.config = batching
        self._queue.job_max_wait_s = batching.job_max_wait_s
        logger.info("batching set to %s", batching.model_dump())

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self._batch_sizes), "dropped": self._dropped,
                "batch_models": list(self._batch_models),
                "requeued": self._requeued, "waiting": len(self._queue),
                "batching": self._queue.config.model_dump()}

    async def generate(self, call: GenerationItem) -> ModelResult:
        """One call's images, once a model replica has run the batch it joined."""
        future: asyncio.Future[ModelResult] = asyncio.get_running_loop().create_future()
        try:
            pending = self._queue.add(call, future)
        except QueueFull:
            return ModelResult(error="overloaded")
        self._publish_depth()
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The client went away (Serve cancels the request chain). Before its batch is
            # formed the call is simply dropped; after, its batch runs for its batch-mates.
            if self._queue.remove(pending):
                self._dropped += 1
                self._metrics.record_dropped("client_left")
                self._publish_depth()
            raise

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._queue):
                known = self._known_replicas()
                if self._running and known is not None and len(self._running) >= known:
                    await self._wait_for_a_free_replica()
                await self._wait_for_company()
                batch = self._queue.next_batch()
                if not batch:
                    break
                self._publish_depth()
                try:
                    await self._hand_over(batch)
                except Exception:  # never let the dispatcher die: the calls get an error
                    logger.exception("batch hand-over failed")
                    self._finish(batch, lambda _: ModelResult(error="batching_failed"))

    def _known_replicas(self) -> int | None:
        """Model replicas the handle's router knows of: with fewer of our batches running,
        one is free (one batcher replica: exactly; several: nearly). None (not known: Ray's
        internals moved, logged and counted by ray_compat): batches go as they form and may
        wait at the router."""
        return known_replicas(self._model)

    async def _wait_for_a_free_replica(self) -> None:
        """A batch of ours runs on every replica: the next is formed when one of them ends,
        from what waits then (in priority order). Formed earlier, it would sit at the
        model's router while later, more urgent calls arrive. Waiting on our own batches
        (not on a probe call) costs no round trip; with several batcher replicas sharing
        the model replicas, a batch may still wait briefly at the router."""
        running = set(self._running)
        if running:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    async def _wait_for_company(self) -> None:
        """batch_wait_timeout_s > 0: let the oldest waiting call gather batch-mates for up to
        that long, or until a full batch is waiting."""
        wait_s = self._queue.config.batch_wait_timeout_s
        oldest = self._queue.oldest_arrival()
        if wait_s <= 0 or oldest is None:
            return
        while len(self._queue) < self._queue.config.max_batch_size:
            remaining = oldest + wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _hand_over(self, batch: list[Pending]) -> None:
        """Send the batch and wait until a model replica has taken it: only then is the
        next batch formed, from everything that arrived meanwhile."""
        now = time.monotonic()
        self._batch_sizes.append(len(batch))
        self._batch_models.append(sorted({p.call.model or "" for p in batch}))
        self._metrics.record_batch(len(batch), [(p.call.priority, now - p.arrived)
                                                for p in batch])
        model_id = batch[0].call.model or self.config.default_model_id
        response = self._model_handle(model_id).run_batch.remote(
            ModelBatch(tuple(p.call for p in batch), backlog=len(self._queue)))
        try:
            # Resolves when the router has assigned the batch to a replica with a free slot.
            await wait_assigned(response)
        except REPLICA_LOST as exc:
            self._lost(batch, exc)
            return
        task = asyncio.get_running_loop().create_task(self._collect(batch, response))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _collect(self, batch: list[Pending], response: Any) -> None:
        try:
            results: list[ModelResult] = await response
        except REPLICA_LOST as exc:
            self._lost(batch, exc)
            return
        except Exception as exc:
            error = type(exc).__name__
            logger.error("batch of %d failed: %s", len(batch), error)
            self._finish(batch, lambda _: ModelResult(error=error))
            return
        by_call = dict(zip(map(id, batch), results))
        self._finish(batch, lambda p: by_call[id(p)])

    def _lost(self, batch: list[Pending], exc: BaseException) -> None:
        retry = [p for p in batch if p.attempts + 1 < REPLICA_LOST_ATTEMPTS
                 and not p.future.done()]
        given_up = [p for p in batch if p not in retry]
        logger.warning("model replica lost (%s): %d calls queued again, %d given up",
                       type(exc).__name__, len(retry), len(given_up))
        self._finish(given_up, lambda _: ModelResult(error="replica_lost"))
        if retry:
            self._requeued += len(retry)
            self._queue.requeue(retry)
            self._publish_depth()
            self._wake.set()

    @staticmethod
    def _finish(batch: list[Pending], result_of: Any) -> None:
        for pending in batch:
            if not pending.future.done():  # a cancelled call's future is done already
                pending.future.set_result(result_of(pending))

    def _model_handle(self, model_id: str) -> Any:
        handle = self._handles.get(model_id)
        if handle is None:
            handle = self._handles[model_id] = self._model.options(
                multiplexed_model_id=model_id)
        return handle

    def _publish_depth(self) -> None:
        self._metrics.set_depth(self._queue.depth(), self._queue.depth_by_model())
