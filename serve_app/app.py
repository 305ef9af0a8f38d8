"""The Ray Serve application builder: `import_path: serve_app.app:build_app`.

Config files hold only `args` (validated as AppConfig) and deployment options; everything
the deployments need is derived here, so the two can't disagree.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from serve_app import confidential
from serve_app.batching.deployment import Batcher
from serve_app.config import AppConfig, load_config
from serve_app.ingress.deployment import Ingress
from serve_app.jobs.broker import confidential_urls
from serve_app.jobs.consumer import (
    RUNNING_JOBS_METRIC,
    EmbeddedBrokerDeployment,
    consumer_deployment,
)
from serve_app.model.deployment import Text2ImageModel

logger = logging.getLogger("ray.serve")


def model_deployment_options(config: AppConfig) -> dict[str, Any]:
    replica = config.replica
    actor_options: dict[str, Any] = {"num_cpus": replica.num_cpus}
    if replica.num_gpus:
        actor_options["num_gpus"] = replica.num_gpus
    if replica.memory_gib:
        actor_options["memory"] = int(replica.memory_gib * 1024**3)
    if replica.resources:
        actor_options["resources"] = dict(replica.resources)
    options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        "max_ongoing_requests": replica.max_ongoing_requests,
        # Calls wait in the batcher (bounded there); at most one formed batch per batcher
        # replica waits here for a free replica.
        "max_queued_requests": -1,
        # Loading and warming the real model takes minutes on a cold node.
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 120,
    }
    if replica.autoscaling is not None:
        auto = replica.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": auto.min_replicas,
            "initial_replicas": auto.initial_replicas or max(auto.min_replicas, 1),
            "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests,
            "upscale_delay_s": auto.upscale_delay_s,
            "downscale_delay_s": auto.downscale_delay_s,
            # Ongoing batches plus the batcher's backlog (batching/autoscaling.py).
            "policy": {"policy_function": "serve_app.batching.autoscaling:backlog_policy"},
        }
    else:
        options["num_replicas"] = replica.num_replicas
    return options


def ingress_deployment_options(config: AppConfig) -> dict[str, Any]:
    ingress = config.ingress
    actor_options: dict[str, Any] = {"num_cpus": ingress.num_cpus}
    if ingress.resources:
        actor_options["resources"] = dict(ingress.resources)
    return {
        "num_replicas": ingress.num_replicas,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": ingress.max_ongoing_requests,
        "max_queued_requests": ingress.max_queued_requests,
        # A stopping ingress replica finishes its requests first (the pod drain gives 140 s:
        # kuberay/README.md); Serve's default would cut them off after 20 s.
        "graceful_shutdown_timeout_s": 120,
    }


# Every waiting call is an ongoing request of the batcher: its own queue limit
# (replica.max_queued_requests per batcher replica) is what turns clients away, with 503.
BATCHER_MAX_ONGOING_REQUESTS = 100_000


def batcher_deployment_options(config: AppConfig) -> dict[str, Any]:
    actor_options: dict[str, Any] = {"num_cpus": config.batcher.num_cpus}
    resources = config.batcher.resources
    if resources is None:
        resources = config.ingress.resources
    if resources:
        actor_options["resources"] = dict(resources)
    return {
        "num_replicas": config.batcher.num_replicas,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": BATCHER_MAX_ONGOING_REQUESTS,
        "max_queued_requests": -1,
        "user_config": config.batching_user_config,
        "graceful_shutdown_timeout_s": 120,
    }


def consumer_deployment_options(config: AppConfig) -> dict[str, Any]:
    consumer = config.jobs.consumer
    actor_options: dict[str, Any] = {"num_cpus": consumer.num_cpus}
    resources = consumer.resources
    if resources is None:
        resources = config.ingress.resources
    if resources:
        actor_options["resources"] = dict(resources)
    return {
        "ray_actor_options": actor_options,
        # The Celery worker threads: jobs one replica runs at once.
        "max_ongoing_requests": consumer.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": consumer.min_replicas,
            "initial_replicas": consumer.min_replicas,
            "max_replicas": consumer.max_replicas,
            "target_ongoing_requests": consumer.target_ongoing_requests,
            "upscale_delay_s": consumer.upscale_delay_s,
            "downscale_delay_s": consumer.downscale_delay_s,
            "downscale_to_zero_delay_s": consumer.downscale_delay_s,
            # Queue length (read from the broker) plus running jobs (jobs/broker.py).
            "policy": {"policy_function": "serve_app.jobs.broker:QueueDepthPolicy",
                       "policy_kwargs": {
                           "broker": config.jobs.broker.model_dump(mode="json"),
                           "poll_interval_s": consumer.queue_poll_interval_s,
                           "running_metric": RUNNING_JOBS_METRIC}},
        },
        # A stopping consumer finishes the jobs it runs (each bounded by the request
        # timeout); one cut off is delivered again after the visibility timeout.
        "graceful_shutdown_timeout_s": config.ingress.request_timeout_s + 30,
    }


def build_app(args: dict[str, Any] | None = None) -> Application:
    # model.source and model.tiny_vae_source are not checked here: this runs in the Serve
    # controller (the head pod), which never reads the weights and on KubeRay runs the lite
    # image without them. Each model replica checks the directory where it loads it
    # (resolve_model_dir, resolve_tiny_vae_dir), with the same one-line error.
    config = load_config(args)
    # What is known before any replica starts (a URL from a Secret is checked in them).
    confidential.check(config, **confidential_urls(config, resolve_env=False))
    payload = config.model_dump(mode="json")
    # @serve.deployment turns each class into a Deployment; mypy keeps the class type.
    model = Text2ImageModel.options(  # type: ignore[attr-defined]
        **model_deployment_options(config)).bind(payload)
    batcher = Batcher.options(  # type: ignore[attr-defined]
        **batcher_deployment_options(config)).bind(model, payload)
    # Bound into the application through the ingress (which never calls them), so one
    # `serve run` starts and stops them with the rest.
    job_deployments = [consumer_deployment(config).options(
        **consumer_deployment_options(config)).bind(batcher, payload)]
    if config.jobs.broker.url == "embedded" and not config.jobs.broker.url_env:
        job_deployments.append(EmbeddedBrokerDeployment.options(
            num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(payload))
    return Ingress.options(  # type: ignore[attr-defined]
        **ingress_deployment_options(config)).bind(batcher, model, payload,
                                                   job_deployments=job_deployments)
