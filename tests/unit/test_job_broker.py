"""The jobs' broker settings: config rules, URLs from the environment, the task-processor
config handed to Ray's Celery adapter, the consumer's autoscaling signal. No Redis here
(tests/integration runs a real one)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.jobs.broker import (
    JobsCeleryAdapter,
    QueueDepthPolicy,
    broker_url,
    keys_url,
    task_processor_config,
)
from serve_app.jobs.service import JobRetry


def config(**jobs) -> AppConfig:
    return AppConfig.model_validate({"jobs": jobs})


def test_the_default_broker_is_the_embedded_redis_on_loopback():
    cfg = config().jobs.broker
    assert (broker_url(cfg), keys_url(cfg)) == ("redis://127.0.0.1:6390/0",) * 2
    assert cfg.embedded_dir is not None and cfg.embedded_dir.endswith("sdxl-turbo-broker")


def test_a_url_from_the_environment_stays_out_of_the_adapter_config(monkeypatch):
    monkeypatch.setenv("TEST_JOBS_URL", "redis://:secret@redis.internal:6379/1")
    app = config(broker={"url_env": "TEST_JOBS_URL"})
    tpc = task_processor_config(app)
    assert tpc.adapter_config.broker_url == "env:TEST_JOBS_URL"
    assert tpc.adapter_config.backend_url == "env:TEST_JOBS_URL"
    assert "secret" not in repr(tpc)
    # Resolved where the adapter is made (inside the replica).
    adapter = JobsCeleryAdapter(tpc)
    assert adapter._config.adapter_config.broker_url == "redis://:secret@redis.internal:6379/1"


def test_an_unset_url_variable_fails_with_its_name(monkeypatch):
    monkeypatch.delenv("TEST_JOBS_URL", raising=False)
    with pytest.raises(RuntimeError, match="TEST_JOBS_URL, which is not set"):
        broker_url(config(broker={"url_env": "TEST_JOBS_URL"}).jobs.broker)


def test_the_task_processor_config_gives_late_acks_a_dlq_and_retries_by_the_runner():
    tpc = task_processor_config(config(max_attempts=4, broker={"queue_name": "q1"}))
    assert (tpc.queue_name, tpc.failed_task_queue_name) == ("q1", "q1-failed")
    # The runner ends a job itself after max_attempts; Celery has no limit of its own.
    assert tpc.max_retries is None
    task = tpc.adapter_config.task_custom_config
    assert task["autoretry_for"] == (JobRetry,) and task["ignore_result"] is True
    assert task["max_retries"] is None
    app = tpc.adapter_config.app_custom_config
    assert app["worker_prefetch_multiplier"] == 1
    assert tpc.adapter_config.broker_transport_options["visibility_timeout"] == 900.0


def test_rabbitmq_needs_a_redis_for_the_keys_and_its_management_api():
    mgmt = {"management_url": "http://guest:guest@mq:15672/api/"}
    with pytest.raises(ValidationError, match="keys_url"):
        config(broker={"url": "amqp://guest:guest@mq:5672//", **mgmt})
    with pytest.raises(ValidationError, match="management_url"):
        config(broker={"url": "amqp://guest:guest@mq:5672//", "keys_url": "redis://k:6379"})
    cfg = config(broker={"url": "amqp://guest:guest@mq:5672//",
                         "keys_url": "redis://keys:6379/0", **mgmt}).jobs.broker
    assert (broker_url(cfg), keys_url(cfg)) == ("amqp://guest:guest@mq:5672//",
                                                "redis://keys:6379/0")


def test_a_visibility_timeout_shorter_than_a_run_is_refused():
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        AppConfig.model_validate({"ingress": {"request_timeout_s": 300},
                                  "jobs": {"broker": {"visibility_timeout_s": 305}}})


class Ctx:
    """The AutoscalingContext fields the async-inference policy reads."""

    def __init__(self, replicas: int, requests: float, running: dict) -> None:
        from ray.serve.config import AutoscalingConfig, AutoscalingContext

        self.ctx = AutoscalingContext(
            deployment_id=None, deployment_name="JobConsumer", app_name="a",
            current_num_replicas=replicas, target_num_replicas=replicas,
            running_replicas=[], total_num_requests=requests,
            total_queued_requests=None, aggregated_metrics={"jobs_running": running},
            raw_metrics=None, capacity_adjusted_min_replicas=0,
            capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None,
            last_scale_down_time=None, current_time=None,
            config=AutoscalingConfig(target_ongoing_requests=8, min_replicas=0,
                                     max_replicas=4))


def test_the_consumer_policy_counts_waiting_and_running_jobs():
    async def decide(ctx, queued: int):
        policy = QueueDepthPolicy(broker=config().jobs.broker.model_dump(mode="json"),
                                  poll_interval_s=1e9, running_metric="jobs_running")
        policy._queue_length = queued
        policy._last_poll_time = float("inf")  # no broker poll in this test
        policy._broker = object()
        return policy(ctx)[0]

    import asyncio

    assert asyncio.run(decide(Ctx(0, 0, {}).ctx, 0)) == 0  # nothing: zero replicas
    assert asyncio.run(decide(Ctx(0, 0, {}).ctx, 3)) == 1  # from zero on the first job
    assert asyncio.run(decide(Ctx(1, 0, {"r1": 8.0}).ctx, 8)) == 2  # 16 jobs / 8 per replica
    # The queue is empty but a replica still runs jobs: it stays.
    assert asyncio.run(decide(Ctx(1, 0, {"r1": 3.0}).ctx, 0)) == pytest.approx(3 / 8)
