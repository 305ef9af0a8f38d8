"""Every reach into Ray Serve's internals, in one place, below the deployments.

Ray 2.60 has no public API for these two, so they read private attributes; each has a test
against the installed Ray (tests/unit/test_ray_compat.py, and with a running Serve
tests/integration/test_ray_compat.py) that fails loudly when an upgrade moves them. When one
is gone at run time nothing fails silently: the caller gets a visible "unknown" (None, or no
wait), one warning per reach in the replica's log, and the gauge
`ray_sdxl_ray_compat_degraded{reach}` goes to 1 (it reads 0 once the reach has worked).

* `known_replicas(handle)`: replicas a deployment handle's router knows of (the batcher
  forms a batch only when one of them is free). A public way would be a custom request
  router (`RequestRouterConfig`, alpha in 2.60) on the model deployment that publishes its
  replica count to the batcher's process: not used yet, for one attribute path.
* `TlsQueueLengthPolicy`: Serve's async-inference autoscaling policy, which reads the
  queue's length through Ray's private `Broker`; for a `rediss://` broker it needs Celery's
  `broker_use_ssl` (it ignores the URL's query and refuses rediss:// without them), which
  the public constructor cannot pass, so the broker is built here with them.
* `wait_assigned(response)`: resolves when a DeploymentResponse's request has been
  assigned to a replica (not when it has finished). `_to_object_ref` (DeveloperAPI) waits
  for the same thing but requires by-reference results and is private-named too.
* `evict_least_recently_used(load_model)`: the model replica's memory budget
  (replica.models_memory_gib). `@serve.multiplexed` evicts only by count
  (max_num_models_per_replica); to make room by size the replica asks Ray's own multiplex
  wrapper (its private `__serve_multiplex_wrapper`, `models`, `unload_model_lru` and
  `_push_multiplexed_replica_info`) to unload its least recently used model, so Ray's LRU
  order, its unload path and what the router learns stay the one truth. Without them the
  count limit still holds; the memory budget is then not kept (logged and counted).

Where Ray 2.60 has a public API it is used: `with_more_requests` builds a new
AutoscalingContext (a stable public class) with a larger request count, for the custom
autoscaling policies (serve_app/batching/autoscaling.py, serve_app/jobs/broker.py).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

from ray.serve.async_inference_autoscaling_policy import AsyncInferenceAutoscalingPolicy
from ray.serve.config import AutoscalingContext

from serve_app.metrics import RAY_COMPAT_DEGRADED

logger = logging.getLogger("ray.serve")

HANDLE_REPLICAS = "handle_replica_count"
RESPONSE_ASSIGNED = "response_assigned"
MULTIPLEX_EVICT = "multiplex_evict"
# Where @serve.multiplexed keeps its wrapper: on the decorated function's object (for a
# function decorated at run time, the function itself: functools.wraps' __wrapped__).
_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"

_lock = threading.Lock()
_warned: set[str] = set()
# reach -> the gauge value last set.
_state: dict[str, int] = {}
_gauge: Any = None


def _report(reach: str, degraded: int) -> None:
    # Set on every reach (once per batch: cheap), not only on a change: a gauge set once
    # was seen missing from a later scrape of the live endpoint under a loaded CI run.
    global _gauge
    with _lock:
        _state[reach] = degraded
    try:
        with _lock:
            if _gauge is None:
                from ray.serve import metrics

                _gauge = metrics.Gauge(
                    RAY_COMPAT_DEGRADED,
                    description="1 while a Ray internal this replica reads is missing from "
                                "the installed Ray (serve_app/ray_compat.py), by reach.",
                    tag_keys=("reach",))
        _gauge.set(degraded, tags={"reach": reach})
    except Exception:  # a metrics failure (no replica context) must not break the caller
        logger.debug("ray_compat: could not set %s", RAY_COMPAT_DEGRADED)


def _degraded(reach: str, detail: str) -> None:
    """A private reach is gone: warn once per process and reach; the gauge goes to 1."""
    with _lock:
        first = reach not in _warned
        _warned.add(reach)
    if first:
        logger.warning("ray_compat: %s is unavailable in this Ray (%s); running without it "
                       "(see serve_app/ray_compat.py)", reach, detail)
    _report(reach, 1)


def known_replicas(handle: Any) -> int | None:
    """Replicas the handle's router knows of; None while the router has not started (no
    call made yet) or when Ray's internals moved (logged and counted)."""
    try:
        router = handle._router
        if router is None:
            return None
        request_router = router._asyncio_router.request_router
        if request_router is None:
            return None
        count = len(request_router.curr_replicas)
    except AttributeError as exc:
        _degraded(HANDLE_REPLICAS, f"{type(exc).__name__}: {exc}")
        return None
    _report(HANDLE_REPLICAS, 0)
    return count


async def wait_assigned(response: Any) -> None:
    """Returns once the request is assigned to a replica; raises what assignment raises
    (a lost replica). Without the internal it returns at once (logged and counted)."""
    fetch = getattr(response, "_fetch_future_result_async", None)
    if fetch is None:
        _degraded(RESPONSE_ASSIGNED,
                  f"{type(response).__name__} has no _fetch_future_result_async")
        return
    await fetch()
    _report(RESPONSE_ASSIGNED, 0)


async def evict_least_recently_used(load_model: Any) -> str | None:
    """Unloads the least recently used model held by `load_model` (a function decorated
    at run time with @serve.multiplexed) the way Ray's own count limit does (the model's
    __del__ is called, the router is told), and returns its id. None when it holds none,
    or when Ray's internals moved (logged and counted: nothing is unloaded)."""
    wrapper = getattr(getattr(load_model, "__wrapped__", None), _MULTIPLEX_ATTR, None)
    if wrapper is None:
        _degraded(MULTIPLEX_EVICT, f"no {_MULTIPLEX_ATTR} on the multiplexed function")
        return None
    models = getattr(wrapper, "models", None)
    unload = getattr(wrapper, "unload_model_lru", None)
    if models is None or unload is None or not hasattr(wrapper,
                                                       "_push_multiplexed_replica_info"):
        _degraded(MULTIPLEX_EVICT, f"{type(wrapper).__name__} has no models, "
                                   "unload_model_lru or _push_multiplexed_replica_info")
        return None
    _report(MULTIPLEX_EVICT, 0)
    if not models:
        return None
    model_id = next(iter(models))
    await unload()
    # Tell the controller (and so the routers) at the next push, as Ray's count limit does.
    wrapper._push_multiplexed_replica_info = True
    return str(model_id)


def with_more_requests(ctx: AutoscalingContext, extra: float) -> AutoscalingContext:
    """The same context with `extra` requests added to total_num_requests, built through
    AutoscalingContext's public constructor from its public attributes. The lazily computed
    metrics stay lazy."""
    fields: dict[str, Any] = {}
    for name in inspect.signature(AutoscalingContext.__init__).parameters:
        if name == "self":
            continue
        if name == "total_num_requests":
            fields[name] = ctx.total_num_requests + extra
        elif name in ("aggregated_metrics", "raw_metrics"):
            fields[name] = (lambda attr: lambda: getattr(ctx, attr))(name)
        elif name == "total_queued_requests":
            fields[name] = (lambda: ctx.total_queued_requests)
        else:
            fields[name] = getattr(ctx, name)
    return AutoscalingContext(**fields)


class TlsQueueLengthPolicy(AsyncInferenceAutoscalingPolicy):
    """AsyncInferenceAutoscalingPolicy whose queue-length reader gets TLS settings
    (`broker_use_ssl`, Celery's form) for a rediss:// broker. Without them Ray's reader
    refuses rediss://: the subclass builds its private `_broker` first, then lets Ray's
    `_ensure_broker` go on (it keeps a broker already built)."""

    def __init__(self, *args: Any, broker_use_ssl: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._compat_broker_use_ssl = broker_use_ssl

    def _ensure_broker(self) -> None:
        if self._compat_broker_use_ssl is not None and getattr(self, "_broker", None) is None:
            from ray.serve._private.broker import Broker

            self._broker = Broker(self._broker_url,
                                  broker_use_ssl=self._compat_broker_use_ssl)
        super()._ensure_broker()
