"""The job queue on a real broker through Ray Serve's task-processor API (Celery adapter),
idempotency keys in Redis, and the consumer's queue-length autoscaling policy.

Why Celery and not Taskiq: in Ray 2.60 `TaskiqTaskProcessorAdapter` only creates its
broker; registering handlers, enqueueing and consuming raise NotImplementedError. The
Celery adapter runs handlers with late acknowledgement (a message is acknowledged after its
handler returns, so a consumer killed mid-job leaves it to be delivered again), routes a
task that failed past its retries to a dead-letter queue, and uses BRPOP on Redis (a job
is picked up as soon as it is pushed, no polling delay).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ray.serve.config import AutoscalingContext
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_processor import CeleryTaskProcessorAdapter

from serve_app.config import AppConfig, BrokerConfig
from serve_app.jobs.service import JobRetry
from serve_app.ray_compat import TlsQueueLengthPolicy, with_more_requests

logger = logging.getLogger("ray.serve")

RUN_JOB_TASK = "run_job"
ENV_PREFIX = "env:"


class BrokerUnset(RuntimeError):
    pass


def _from_env(name: str, what: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise BrokerUnset(f"{what} names the environment variable {name}, which is not set "
                          "(a Kubernetes Secret's key, see kuberay/README.md)")
    return value


def embedded_url(cfg: BrokerConfig) -> str:
    return f"redis://127.0.0.1:{cfg.embedded_port}/0"


def broker_url(cfg: BrokerConfig) -> str:
    if cfg.url_env:
        return _from_env(cfg.url_env, "jobs.broker.url_env")
    return embedded_url(cfg) if cfg.url == "embedded" else cfg.url


def keys_url(cfg: BrokerConfig) -> str:
    if cfg.keys_url_env:
        return _from_env(cfg.keys_url_env, "jobs.broker.keys_url_env")
    return cfg.keys_url or broker_url(cfg)


def _broker_placeholder(cfg: BrokerConfig) -> str:
    # A URL from a Secret is read inside each replica (JobsCeleryAdapter), never written
    # into the deployment's definition.
    return ENV_PREFIX + cfg.url_env if cfg.url_env else broker_url(cfg)


def _keys_placeholder(cfg: BrokerConfig) -> str:
    if cfg.keys_url_env:
        return ENV_PREFIX + cfg.keys_url_env
    return cfg.keys_url or _broker_placeholder(cfg)


def redis_ssl_options(url: str) -> dict[str, Any]:
    """A rediss:// URL's TLS query parameters as redis-py's keyword arguments."""
    query = {key: values[-1] for key, values in parse_qs(urlsplit(url).query).items()}
    options: dict[str, Any] = {key: unquote(value) for key, value in query.items()
                               if key in ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile",
                                          "ssl_keyfile")}
    if "ssl_check_hostname" in query:
        options["ssl_check_hostname"] = query["ssl_check_hostname"].lower() != "false"
    return options


def _source(url: str | None, env: str | None, field: str) -> str:
    """How an error names a URL: its setting or its environment variable, never the URL
    (it may carry a password)."""
    if env:
        return f"jobs.broker.{field}_env ({env})"
    return "jobs.broker.url (embedded)" if url == "embedded" else f"jobs.broker.{field}"


def confidential_urls(config: AppConfig, *, resolve_env: bool = True) -> dict[str, Any]:
    """The Redis URLs the jobs use, named, for serve_app.confidential's checks. The keys
    URL only when it is not the broker's own. `resolve_env` False (the app builder, where a
    Secret's variable may be unset): URLs from the environment are left out (None)."""
    cfg = config.jobs.broker
    out: dict[str, Any] = {"broker": None, "broker_source": _source(cfg.url, cfg.url_env, "url"),
                           "keys": None, "keys_source": _source(cfg.keys_url, cfg.keys_url_env,
                                                                "keys_url")}
    if resolve_env or not cfg.url_env:
        out["broker"] = broker_url(cfg)
    if (cfg.keys_url or cfg.keys_url_env) and (resolve_env or not cfg.keys_url_env):
        out["keys"] = keys_url(cfg)
    return out


def failed_queue(cfg: BrokerConfig) -> str:
    return f"{cfg.queue_name}-failed"


def task_processor_config(config: AppConfig) -> TaskProcessorConfig:
    cfg = config.jobs.broker
    return TaskProcessorConfig(
        queue_name=cfg.queue_name,
        adapter=JobsCeleryAdapter,
        adapter_config=CeleryAdapterConfig(
            broker_url=_broker_placeholder(cfg),
            backend_url=_keys_placeholder(cfg),
            broker_transport_options={
                "visibility_timeout": cfg.visibility_timeout_s,
                # Scan for messages of dead consumers on every poll, not every tenth.
                "unacked_restore_throttle": 1,
            },
            app_custom_config={
                # A consumer reserves only the jobs it runs: a reserved job that waited past
                # the visibility timeout would be delivered a second time.
                "worker_prefetch_multiplier": 1,
                "result_expires": int(config.store.ttl_s),
                "broker_connection_retry_on_startup": True,
                "broker_connection_max_retries": None,  # wait out a broker restart
                "worker_hijack_root_logger": False,
                "worker_redirect_stdouts": False,
            },
            task_custom_config={
                # Only a run that may be tried again is retried by Celery; JobFailed is final
                # and goes to the dead-letter queue. The runner counts attempts itself (a
                # delivery after a lost consumer counts too).
                "autoretry_for": (JobRetry,),
                "max_retries": None,  # Celery's class default (3) would apply otherwise
                "retry_backoff": True,
                "retry_backoff_max": 30,
                # Outcomes live in the job record; no Celery result is written (a result
                # write failing while Redis restarts would count as the task failing).
                "ignore_result": True,
            },
        ),
        # No limit of Celery's own: the runner ends a failing job after jobs.max_attempts
        # (raising JobFailed), and a job deferred by a full batching queue may be retried
        # any number of times (it waits, it does not fail).
        max_retries=None,
        failed_task_queue_name=failed_queue(cfg),
        unprocessable_task_queue_name=f"{cfg.queue_name}-unprocessable",
    )


class JobsCeleryAdapter(CeleryTaskProcessorAdapter):
    """Ray's Celery adapter with broker URLs read from the environment where the config
    says `env:NAME`."""

    def __init__(self, config: TaskProcessorConfig, *args: Any, **kwargs: Any) -> None:
        adapter = config.adapter_config
        resolved = adapter.model_copy(update={
            "broker_url": self._resolve(adapter.broker_url),
            "backend_url": self._resolve(adapter.backend_url)})
        super().__init__(config.model_copy(update={"adapter_config": resolved}),
                         *args, **kwargs)

    @staticmethod
    def _resolve(url: str) -> str:
        if url.startswith(ENV_PREFIX):
            return _from_env(url.removeprefix(ENV_PREFIX), "jobs.broker")
        return url


class JobQueue:
    """The submitting side: pushes a job's id onto the broker (synchronous, as Celery is)."""

    def __init__(self, config: AppConfig) -> None:
        from ray.serve.task_consumer import instantiate_adapter_from_config

        self.adapter = instantiate_adapter_from_config(task_processor_config(config))

    def enqueue(self, job_id: str, base_url: str) -> None:
        self.adapter.enqueue_task_sync(RUN_JOB_TASK, args=[job_id, base_url])


class RedisKeys:
    """Idempotency keys: one Redis SET NX per key, atomic across ingress replicas."""

    def __init__(self, url: str, ttl_s: float, namespace: str) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(url, socket_timeout=10,
                                                   socket_connect_timeout=5)
        self.ttl_s = max(1, int(ttl_s))
        # Per queue: two services sharing one Redis keep their keys apart.
        self.prefix = f"{namespace}:idempotency:"

    def _name(self, key: str) -> str:
        # Hashed: the client's key may be anything, and is not stored in clear.
        return self.prefix + hashlib.sha256(key.encode()).hexdigest()

    async def claim(self, key: str, job_id: str) -> str | None:
        """None when `job_id` now owns the key; else the job id that owned it first."""
        name = self._name(key)
        for _ in range(3):  # the owner's key may expire between our SET and GET
            if await self.client.set(name, job_id, nx=True, ex=self.ttl_s):
                return None
            owner = await self.client.get(name)
            if owner is not None:
                return owner.decode() if isinstance(owner, bytes) else str(owner)
        return None

    async def release(self, key: str, job_id: str) -> None:
        """Frees the key if `job_id` still owns it (its job could not be queued)."""
        name = self._name(key)
        owner = await self.client.get(name)
        if owner is not None and (owner.decode() if isinstance(owner, bytes)
                                  else str(owner)) == job_id:
            await self.client.delete(name)


class QueueDepthPolicy(TlsQueueLengthPolicy):
    """Serve's async-inference policy (queue length plus HTTP load against
    target_ongoing_requests, 0 replicas when both are empty) with the broker URL resolved
    where the policy runs (the controller), from the environment when the config says so."""

    def __init__(self, broker: dict[str, Any], poll_interval_s: float,
                 running_metric: str) -> None:
        cfg = BrokerConfig.model_validate(broker)
        url = broker_url(cfg)
        # Ray's queue-length reader takes a rediss:// broker's TLS settings only as Celery's
        # broker_use_ssl, read here from the URL (the form kombu and redis-py read themselves).
        tls = redis_ssl_options(url) if urlsplit(url).scheme == "rediss" else None
        super().__init__(broker_url=url, queue_name=cfg.queue_name,
                         rabbitmq_management_url=cfg.management_url,
                         poll_interval_s=poll_interval_s, broker_use_ssl=tls)
        self.running_metric = running_metric

    def __call__(self, ctx: AutoscalingContext) -> tuple[int | float, dict[str, Any]]:
        # Jobs being run are off the queue (unacknowledged) and are no HTTP requests either:
        # counted as requests, they keep their replicas until they end.
        running = sum((ctx.aggregated_metrics or {}).get(self.running_metric, {}).values())
        if running > 0:
            ctx = with_more_requests(ctx, running)
        return super().__call__(ctx)
