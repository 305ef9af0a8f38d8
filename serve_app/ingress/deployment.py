"""The HTTP ingress deployment: builds the services of one replica and the FastAPI app that
routes to them (serve_app/ingress/routes/, one module per protocol).

It imports no torch, diffusers or PIL: images arrive as uint8 arrays and are encoded here,
so the model replica goes on to its next batch while the ingress writes PNGs.
"""


import logging
import threading
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import BackPressureError

from serve_app import confidential
from serve_app.config import AppConfig
from serve_app.errors import install_error_handlers
from serve_app.generation.service import GenerationService
from serve_app.ingress.auth import ApiKeys
from serve_app.ingress.head_requests import HeadAsGet
from serve_app.ingress.openai_api import OpenAIImagesService
from serve_app.ingress.readiness import ReadinessProbe
from serve_app.ingress.routes import jobs, native, openai, streams
from serve_app.ingress.services import IngressServices
from serve_app.jobs.broker import JobQueue, RedisKeys, confidential_urls, keys_url
from serve_app.jobs.service import JobService
from serve_app.ray_compat import known_replicas
from serve_app.store import ImageStore
from serve_app.tee import check_tee

logger = logging.getLogger("ray.serve")

# The most a /readyz waits for a model replica (Kubernetes' probe timeout is 1 s).
READY_PROBE_WAIT_S = 0.5


def build_http_app(services: IngressServices) -> FastAPI:
    """The FastAPI app over these services: every protocol's routes, HEAD wherever GET,
    and the error handlers (one JSON error body, OpenAI's shape under /v1/)."""
    app = FastAPI(
        title="SDXL-Turbo text-to-image",
        version="0.1.0",
        description="Text-to-image on CPU replicas; API compatible with "
                    "stable-diffusion-ipex.",
    )
    app.add_middleware(HeadAsGet)
    install_error_handlers(app)
    app.state.services = services
    for routes in (native, streams, jobs, openai):
        app.include_router(routes.router)
    return app


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """One ingress replica: its services, and the HTTP app over them (built by Serve once
    the replica is constructed, `__serve_build_asgi_app__`)."""

    # job_deployments (JobConsumer, EmbeddedBroker) are never called from here: bound in,
    # they belong to the application (app.py).
    def __init__(self, batcher: Any, model: Any, config: dict[str, Any],
                 job_deployments: list[Any] | None = None) -> None:
        self.config = AppConfig.model_validate(config)
        security = self.config.security
        self.tee = check_tee(security.require_tee, security.tee_probe)
        # The broker's URL is known here (from the environment too): confidential mode's
        # checks of what leaves the TEE run before anything is sent.
        urls = confidential_urls(self.config)
        confidential.check(self.config, **urls)
        confidential.check_certificates(urls)
        protections = confidential.protections(self.config, urls["broker"], urls["keys"])
        api_keys = ApiKeys.from_env(security.api_keys_env)
        # Generation goes through the batching deployment; the model is asked only for its
        # info (/readyz).
        self.model = model
        store_cfg = self.config.store
        assert store_cfg.url is not None  # AppConfig fills in the per-application default
        self.store = ImageStore(store_cfg.url, store_cfg.storage_options)
        readiness = ReadinessProbe(self._model_info, busy_errors=(BackPressureError,),
                                   wait_s=READY_PROBE_WAIT_S,
                                   replicas=self._model_replicas
                                   if self._model_never_at_zero() else None)
        readiness.start()
        self._stop = threading.Event()
        self._cleaner = threading.Thread(target=self._cleanup_loop, name="store-cleanup",
                                         daemon=True)
        self._cleaner.start()
        generation = GenerationService(batcher, self.store, self.config)
        # Jobs are queued on the broker; the JobConsumer deployment runs them.
        broker = self.config.jobs.broker
        jobs_service = JobService(self.store, self.config, JobQueue(self.config),
                                  RedisKeys(keys_url(broker), self.config.store.ttl_s,
                                            broker.queue_name))
        self.services = IngressServices(
            config=self.config, api_keys=api_keys,
            store=self.store, generation=generation, jobs=jobs_service,
            openai=OpenAIImagesService(generation, self.store, self.config),
            readiness=readiness, protections=protections)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.services)

    async def _model_info(self) -> dict[str, Any]:
        return await self.model.info.remote()

    def _model_never_at_zero(self) -> bool:
        """No model replica is a fault only where the model never scales to zero (there,
        a probe saying not ready would keep away the traffic that scales it up)."""
        auto = self.config.replica.autoscaling
        return auto is None or auto.min_replicas >= 1

    def _model_replicas(self) -> int | None:
        """Running model replicas as the handle's router knows them (the controller tells it
        when one starts or dies); None when not known (serve_app/ray_compat.py)."""
        return known_replicas(self.model)

    def _cleanup_loop(self) -> None:
        cfg = self.config.store
        while not self._stop.wait(cfg.cleanup_interval_s):
            try:
                self.store.cleanup(cfg.ttl_s)
            except Exception:
                logger.exception("image store cleanup failed; retrying next interval")

    def __del__(self) -> None:
        self._stop.set()
