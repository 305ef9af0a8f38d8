"""serve_app/ray_compat.py against the installed Ray: every private attribute it reaches is
still there (an upgrade that moves one fails here, loudly), the public AutoscalingContext
path keeps every field, and a missing internal degrades visibly (a warning), never
silently. The same reaches on a running Serve: tests/integration/test_ray_compat.py."""

import asyncio
import inspect
import logging

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve._private.request_router.request_router import RequestRouter
from ray.serve._private.router import AsyncioRouter, CurrentLoopRouter, SingletonThreadRouter
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app import ray_compat


def test_the_response_still_has_the_assignment_wait():
    assert inspect.iscoroutinefunction(DeploymentResponse._fetch_future_result_async)


def test_the_handle_router_path_is_still_there():
    # handle._router: None until the first call starts the router.
    assert DeploymentHandle("Text2ImageModel", "app")._router is None
    # ._asyncio_router: set by both router wrappers a handle may use.
    for wrapper in (SingletonThreadRouter, CurrentLoopRouter):
        assert "self._asyncio_router = AsyncioRouter(" in inspect.getsource(wrapper.__init__)
    # .request_router and .curr_replicas: properties.
    assert isinstance(inspect.getattr_static(AsyncioRouter, "request_router"), property)
    assert isinstance(inspect.getattr_static(RequestRouter, "curr_replicas"), property)


def test_a_handle_that_has_made_no_call_knows_no_replicas_yet():
    assert ray_compat.known_replicas(DeploymentHandle("Text2ImageModel", "app")) is None


class _Moved:
    """A handle whose router moved its internals (what a Ray upgrade could do)."""

    _router = object()


def test_a_moved_router_degrades_visibly(caplog):
    ray_compat._warned.clear()
    ray_compat._state.clear()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert ray_compat.known_replicas(_Moved()) is None
        assert ray_compat.known_replicas(_Moved()) is None
    warnings = [r.getMessage() for r in caplog.records if "ray_compat" in r.getMessage()]
    assert len(warnings) == 1  # once per process and reach, counted every time
    assert warnings[0].startswith("ray_compat: handle_replica_count is unavailable")
    assert ray_compat._state == {ray_compat.HANDLE_REPLICAS: 1}  # the gauge's value


def test_a_response_without_the_wait_degrades_visibly(caplog):
    ray_compat._warned.clear()
    ray_compat._state.clear()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert asyncio.run(ray_compat.wait_assigned(object())) is None
    assert [r.getMessage() for r in caplog.records if "ray_compat" in r.getMessage()] == [
        "ray_compat: response_assigned is unavailable in this Ray (object has no "
        "_fetch_future_result_async); running without it (see serve_app/ray_compat.py)"]


def context(calls: list[str]) -> AutoscalingContext:
    deployment = DeploymentID(name="Text2ImageModel", app_name="app")
    ids = [ReplicaID(unique_id="r0", deployment_id=deployment)]

    def aggregated() -> dict:
        calls.append("aggregated")
        return {"backlog_batches": {ids[0]: 2.0}}

    def raw() -> dict:
        calls.append("raw")
        return {}

    return AutoscalingContext(
        deployment_id=deployment, deployment_name="Text2ImageModel", app_name="app",
        current_num_replicas=1, target_num_replicas=1, running_replicas=ids,
        total_num_requests=3.0, total_queued_requests=1.0,
        aggregated_metrics=aggregated, raw_metrics=raw,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8,
        policy_state={"k": 1}, last_scale_up_time=1.0, last_scale_down_time=2.0,
        current_time=3.0, config=AutoscalingConfig(min_replicas=1, max_replicas=8))


def test_more_requests_through_the_public_constructor_keeps_every_other_field():
    calls: list[str] = []
    ctx = context(calls)
    more = ray_compat.with_more_requests(ctx, 2.5)
    assert more.total_num_requests == 5.5
    assert ctx.total_num_requests == 3.0  # the original is untouched
    assert calls == []  # the metrics stay lazy
    names = [n for n in inspect.signature(AutoscalingContext.__init__).parameters
             if n not in ("self", "total_num_requests")]
    assert {n: getattr(more, n) for n in names} == {n: getattr(ctx, n) for n in names}
    assert more.policy_state is ctx.policy_state  # the policy's state persists through it
    assert sorted(calls) == ["aggregated", "raw"]
    assert more.total_running_requests == 4.5


@pytest.mark.parametrize("name", ["total_num_requests", "aggregated_metrics", "raw_metrics",
                                  "total_queued_requests"])
def test_the_lazy_fields_are_still_cached_properties(name):
    """with_more_requests relies on these being computed on first read (from a value or a
    callable), as AutoscalingContext documents."""
    from functools import cached_property

    assert isinstance(inspect.getattr_static(AutoscalingContext, name), cached_property)


def test_the_queue_length_policy_still_keeps_a_broker_built_before_it():
    """TlsQueueLengthPolicy builds Ray's private `_broker` (with TLS settings) before Ray's
    `_ensure_broker` runs: that only works while Ray's policy keeps its URL in `_broker_url`
    and leaves a broker already built alone."""
    from ray.serve.async_inference_autoscaling_policy import AsyncInferenceAutoscalingPolicy

    policy = AsyncInferenceAutoscalingPolicy(broker_url="redis://127.0.0.1:1/0",
                                             queue_name="q")
    assert policy._broker_url == "redis://127.0.0.1:1/0"
    assert policy._broker is None
    sentinel = object()
    policy._broker = sentinel
    policy._ensure_broker()
    assert policy._broker is sentinel


def test_a_tls_queue_length_policy_builds_its_broker_with_the_tls_settings():
    from ray.serve._private.broker import Redis, RedisSsl

    tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": "/nonexistent/ca.pem"}
    policy = ray_compat.TlsQueueLengthPolicy(broker_url="rediss://127.0.0.1:1/0",
                                             queue_name="q", broker_use_ssl=tls)
    policy._ensure_broker()
    assert type(policy._broker) is RedisSsl
    kwargs = policy._broker.redis.connection_pool.connection_kwargs
    assert (kwargs["ssl_cert_reqs"], kwargs["ssl_ca_certs"]) == ("required",
                                                                 "/nonexistent/ca.pem")
    plain = ray_compat.TlsQueueLengthPolicy(broker_url="redis://127.0.0.1:1/0",
                                            queue_name="q")
    plain._ensure_broker()
    assert type(plain._broker) is Redis


def test_the_multiplex_wrapper_internals_are_still_there():
    from ray import serve
    from ray.serve.multiplex import _ModelMultiplexWrapper

    # Kept on the decorated function's object; a run-time decorated function is reached
    # through functools.wraps' __wrapped__.
    source = inspect.getsource(serve.multiplexed)
    assert 'multiplex_attr = "__serve_multiplex_wrapper"' in source
    assert "@wraps(func)" in source
    assert "multiplex_object = func" in source
    init = inspect.getsource(_ModelMultiplexWrapper.__init__)
    assert "self.models = OrderedDict()" in init
    assert "self._push_multiplexed_replica_info: bool = False" in init
    assert inspect.iscoroutinefunction(_ModelMultiplexWrapper.unload_model_lru)
    # Its LRU: the first key is the least recently used (popitem(last=False)).
    assert "self.models.popitem(last=False)" in inspect.getsource(
        _ModelMultiplexWrapper.unload_model_lru)
    assert "self.models.move_to_end(model_id)" in inspect.getsource(
        _ModelMultiplexWrapper.load_model)


class _Wrapper:
    """What @serve.multiplexed keeps (the attributes ray_compat reads), in memory."""

    def __init__(self, models):
        self.models = models
        self._push_multiplexed_replica_info = False
        self.unloaded = []

    async def unload_model_lru(self):
        model_id, _ = self.models.popitem(last=False)
        self.unloaded.append(model_id)


def _decorated(wrapper):
    async def load(model_id):
        return model_id

    async def decorated(model_id):
        return await load(model_id)
    decorated.__wrapped__ = load
    if wrapper is not None:
        setattr(load, "__serve_multiplex_wrapper", wrapper)
    return decorated


def test_evicting_unloads_rays_least_recently_used_model_and_tells_the_router():
    from collections import OrderedDict

    ray_compat._state.clear()
    wrapper = _Wrapper(OrderedDict([("old", 1), ("new", 2)]))
    load = _decorated(wrapper)
    assert asyncio.run(ray_compat.evict_least_recently_used(load)) == "old"
    assert (wrapper.unloaded, list(wrapper.models)) == (["old"], ["new"])
    assert wrapper._push_multiplexed_replica_info is True
    assert asyncio.run(ray_compat.evict_least_recently_used(load)) == "new"
    assert asyncio.run(ray_compat.evict_least_recently_used(load)) is None  # none held
    assert ray_compat._state == {ray_compat.MULTIPLEX_EVICT: 0}


def test_a_moved_multiplex_wrapper_degrades_visibly(caplog):
    ray_compat._warned.clear()
    ray_compat._state.clear()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert asyncio.run(ray_compat.evict_least_recently_used(_decorated(None))) is None
        moved = _decorated(object())
        assert asyncio.run(ray_compat.evict_least_recently_used(moved)) is None
    warnings = [r.getMessage() for r in caplog.records if "ray_compat" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("ray_compat: multiplex_evict is unavailable")
    assert ray_compat._state == {ray_compat.MULTIPLEX_EVICT: 1}
