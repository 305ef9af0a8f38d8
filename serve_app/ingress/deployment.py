"""The HTTP ingress: validation, ids, fan-out to the model, PNG encoding, the image store.

It imports no torch, diffusers or PIL: images arrive as uint8 arrays and are encoded here,
so the model replica goes on to its next batch while the ingress writes PNGs.
"""


import asyncio
import logging
import secrets
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.responses import HTMLResponse, JSONResponse, Response

from serve_app.config import AppConfig
from serve_app.errors import (
    NotReady,
    install_error_handlers,
    to_response,
)
from serve_app.ingress.auth import ApiKeys
from serve_app.ingress.generation import GenerationService
from serve_app.ingress.head_requests import HeadAsGet
from serve_app.ingress.parsing import parse_request, read_body
from serve_app.ingress.readiness import ReadinessProbe
from serve_app.ingress.schemas import (
    ReadyResponse,
    Text2ImageRequest,
    Text2ImageResponse,
    error_responses,
)
from serve_app.jobs.broker import JobQueue, RedisKeys, keys_url
from serve_app.jobs.records import JobRequest
from serve_app.jobs.service import JobService
from serve_app.metrics import record_error
from serve_app.store import ImageStore
from serve_app.tee import check_tee

logger = logging.getLogger("ray.serve")

# The most a /readyz waits for a model replica (Kubernetes' probe timeout is 1 s).
READY_PROBE_WAIT_S = 0.5
# The playground page at `/`: plain HTML/JS calling the API with relative URLs.
PLAYGROUND_PAGE = Path(__file__).parent / "static" / "index.html"

app = FastAPI(
    title="SDXL-Turbo text-to-image",
    version="0.1.0",
    description="Text-to-image on CPU replicas; API compatible with stable-diffusion-ipex.",
)
app.add_middleware(HeadAsGet)
install_error_handlers(app)


def server_timing(timings: dict[str, float]) -> str:
    """The W3C Server-Timing header: `pipeline;dur=581.2, model;dur=590.4` (milliseconds)."""
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in timings.items())


def _body_schema(model: type[Text2ImageRequest]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


_REQUEST_BODY_SCHEMA = _body_schema(Text2ImageRequest)
_JOB_BODY_SCHEMA = _body_schema(JobRequest)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """Routes only: generation and jobs are plain services (generation.py, jobs/service.py)."""

    # job_deployments (JobConsumer, EmbeddedBroker) are never called from here: bound in,
    # they belong to the application (app.py).
    def __init__(self, batcher: Any, model: Any, config: dict[str, Any],
                 job_deployments: list[Any] | None = None) -> None:
        self.config = AppConfig.model_validate(config)
        security = self.config.security
        self.tee = check_tee(security.require_tee, security.tee_probe)
        self.api_keys = ApiKeys.from_env(security.api_keys_env)
        # Generation goes through the batching deployment; the model is asked only for its
        # info (/readyz).
        self.model = model
        store_cfg = self.config.store
        assert store_cfg.url is not None  # AppConfig fills in the per-application default
        self.store = ImageStore(store_cfg.url, store_cfg.storage_options)
        self._readiness = ReadinessProbe(self._model_info, busy_errors=(BackPressureError,),
                                         wait_s=READY_PROBE_WAIT_S)
        self._readiness.start()
        self._stop = threading.Event()
        self._cleaner = threading.Thread(target=self._cleanup_loop, name="store-cleanup",
                                         daemon=True)
        self._cleaner.start()
        self.generation = GenerationService(batcher, self.store, self.config)
        # Jobs are queued on the broker; the JobConsumer deployment runs them.
        broker = self.config.jobs.broker
        self.jobs = JobService(self.store, self.config, JobQueue(self.config),
                               RedisKeys(keys_url(broker), self.config.store.ttl_s,
                                         broker.queue_name))

    async def _model_info(self) -> dict[str, Any]:
        return await self.model.info.remote()

    def _cleanup_loop(self) -> None:
        cfg = self.config.store
        while not self._stop.wait(cfg.cleanup_interval_s):
            try:
                self.store.cleanup(cfg.ttl_s)
            except Exception:
                logger.exception("image store cleanup failed; retrying next interval")

    def __del__(self) -> None:
        self._stop.set()

    def _authorize(self, request: Request, *, image: bool = False) -> None:
        if self.api_keys is None or (image and not self.config.security.protect_images):
            return
        self.api_keys.check(request.headers.get("authorization"))

    def _base_url(self, request: Request) -> str:
        base = self.config.ingress.public_base_url or str(request.base_url)
        return base.rstrip("/")

    @app.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(PLAYGROUND_PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={200: {"model": ReadyResponse}, **error_responses(503)})
    async def readyz(self) -> JSONResponse:
        readiness = await self._readiness.check()
        if readiness.state == "loading":
            return self._not_ready("model is loading")
        if readiness.state == "unavailable":
            logger.warning("readiness probe failed: %s", readiness.detail)
            return self._not_ready("model is not available")
        info = readiness.info or {}
        return JSONResponse({
            "status": "ready",
            "busy": readiness.state == "busy",
            "model": info.get("model"),
            "backend": info.get("backend"),
            "dtype": info.get("dtype"),
            "dtypeReason": info.get("dtype_reason"),
            "cpu": info.get("cpu"),
            "device": info.get("device"),
            "threads": info.get("threads"),
            "tee": info.get("tee"),
            "optimizations": {"applied": info.get("optimizations", []),
                              "skipped": info.get("optimizations_skipped", {})},
            "warnings": info.get("warnings", []),
        })

    @staticmethod
    def _not_ready(message: str) -> JSONResponse:
        record_error(NotReady.code)
        return to_response(NotReady(message))

    @app.post(
        "/api/text2image",
        response_model=Text2ImageResponse,
        openapi_extra=_REQUEST_BODY_SCHEMA,
        responses=error_responses(401, 413, 422, 500, 503, 504),
    )
    async def text2image(self, request: Request) -> JSONResponse:
        self._authorize(request)
        body = parse_request(await self._read_body(request), self.config)
        request_id = uuid.uuid4().hex
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        timings: dict[str, float] = {}
        response = await self.generation.generate(body, request_id, seed,
                                                  self._base_url(request), timings=timings)
        # No X-Request-ID of ours: Ray Serve's proxy sets that header (the client's own, or
        # its trace id) and logs it beside our id; a second value would contradict it.
        return JSONResponse(response, headers={"Server-Timing": server_timing(timings)})

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request.stream(), request.headers.get("content-length"))

    @app.post("/api/jobs", status_code=202, openapi_extra=_JOB_BODY_SCHEMA,
              responses={200: {"description": "The job this Idempotency-Key already made."},
                         **error_responses(401, 413, 422, 503)})
    async def submit_job(self, request: Request) -> JSONResponse:
        """Queue a generation; poll the status URL, or get a POST at `callbackUrl`."""
        self._authorize(request)
        body = parse_request(await self._read_body(request), self.config, JobRequest)
        record, created = await self.jobs.submit(
            body, request.headers.get("idempotency-key"), self._base_url(request))
        if not created:  # the same Idempotency-Key as an earlier submission
            return JSONResponse(record.public(), status_code=200)
        return JSONResponse(record.public(), status_code=202,
                            headers={"Location": record.statusUrl or ""})

    @app.get("/api/jobs/{job_id}", responses=error_responses(401, 404))
    async def job_status(self, job_id: str, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse((await self.jobs.status(job_id)).public())

    @app.get("/images/{image_id}/{name}", responses=error_responses(401, 404))
    async def image(self, image_id: str, name: str, request: Request) -> Response:
        self._authorize(request, image=True)
        data = await asyncio.to_thread(self.store.get, image_id, name)
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})
