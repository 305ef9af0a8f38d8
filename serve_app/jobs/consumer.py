"""The deployments behind async jobs: JobConsumer (Ray Serve's task consumer, taking jobs
off the broker) and EmbeddedBroker (the quick start's own redis-server).

JobConsumer's handler runs in a Celery worker thread (the Celery adapter takes synchronous
handlers only); it hands each job to one event loop of its own, where the job's calls go to
the batcher at job priority, as the ingress's would.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ray import serve
from ray.serve.task_consumer import task_consumer, task_handler

from serve_app import confidential
from serve_app.config import AppConfig
from serve_app.generation.service import GenerationService
from serve_app.jobs.broker import RUN_JOB_TASK, confidential_urls, task_processor_config
from serve_app.jobs.redis_server import RedisProcess
from serve_app.jobs.service import JobRunner
from serve_app.store import ImageStore
from serve_app.tee import check_tee

logger = logging.getLogger("ray.serve")

RUNNING_JOBS_METRIC = "jobs_running"


class JobConsumer:
    def __init__(self, batcher: Any, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        # It reads the job's request (the prompt): confidential mode covers it as it covers
        # the ingress.
        check_tee(self.config.security.require_tee, self.config.security.tee_probe)
        urls = confidential_urls(self.config)
        confidential.check(self.config, **urls)
        confidential.check_certificates(urls)
        store_cfg = self.config.store
        store = ImageStore(store_cfg.url or "", store_cfg.storage_options)
        generation = GenerationService(batcher, store, self.config)
        self.runner = JobRunner(store, self.config, generation.generate)
        self._running = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="jobs-loop", daemon=True).start()

    @task_handler(name=RUN_JOB_TASK)
    def run_job(self, job_id: str, base_url: str) -> str:
        with self._lock:
            self._running += 1
        try:
            future = asyncio.run_coroutine_threadsafe(self.runner.run(job_id, base_url),
                                                      self._loop)
            return future.result()
        finally:
            with self._lock:
                self._running -= 1

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Jobs this replica is running (the broker's queue length counts only waiting
        ones): the policy keeps a replica that still runs jobs."""
        return {RUNNING_JOBS_METRIC: float(self._running)}

    async def check_health(self) -> None:
        if not self._loop.is_running():
            raise RuntimeError("the consumer's job loop stopped")

    def __del__(self) -> None:
        # Called on shutdown after the Celery worker was told to stop taking jobs (the
        # task-consumer wrapper does that first). Serve may stop a replica that still runs
        # jobs (scaling down picks any replica): let them end and be acknowledged, within
        # the deployment's graceful_shutdown_timeout_s, rather than leave them to be
        # delivered again after the visibility timeout.
        config = getattr(self, "config", None)  # absent when __init__ failed
        if config is None:
            return
        deadline = time.monotonic() + config.ingress.request_timeout_s + 20
        while self._running > 0 and time.monotonic() < deadline:
            time.sleep(0.2)


def consumer_deployment(config: AppConfig) -> Any:
    """JobConsumer as a Serve deployment for this config: the task consumer decorator needs
    the broker's settings when the class is made, and those come from the config."""
    consumer = task_consumer(task_processor_config=task_processor_config(config))(JobConsumer)
    return serve.deployment(name="JobConsumer")(consumer)


class EmbeddedBroker:
    """Owns a redis-server on 127.0.0.1 (jobs.broker.url: embedded). One replica; the
    server dies with it (Linux parent-death signal), and a new replica starts it again on
    the same append-only file, so queued jobs survive."""

    def __init__(self, config: dict[str, Any]) -> None:
        broker = AppConfig.model_validate(config).jobs.broker
        self.server = RedisProcess(broker.embedded_port, broker.embedded_dir or "")
        self.server.start()

    async def check_health(self) -> None:
        if not self.server.alive():
            raise RuntimeError("the embedded redis-server exited")

    async def url(self) -> str:
        return self.server.url

    def __del__(self) -> None:
        self.server.stop()


EmbeddedBrokerDeployment = serve.deployment(name="EmbeddedBroker")(EmbeddedBroker)
