"""The HTTP ingress: validation, ids, fan-out to the model, PNG encoding, the image store.

It imports no torch, diffusers or PIL: images arrive as uint8 arrays and are encoded here,
so the model replica goes on to its next batch while the ingress writes PNGs.
"""


import asyncio
import base64
import logging
import secrets
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from serve_app.config import AppConfig
from serve_app.errors import (
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    install_error_handlers,
    to_response,
)
from serve_app.ingress.auth import ApiKeys
from serve_app.ingress.generation import GenerationService
from serve_app.ingress.head_requests import HeadAsGet
from serve_app.ingress.openai_api import (
    OpenAIEditRequest,
    OpenAIImageRequest,
    OpenAIImagesService,
    openai_error_responses,
)
from serve_app.ingress.parsing import (
    MAX_BODY_BYTES,
    image_body_limit,
    is_multipart,
    load_json_object,
    parse_form,
    parse_request,
    read_body,
    steps_per_call,
    validate_fields,
    validate_request,
)
from serve_app.ingress.readiness import ReadinessProbe
from serve_app.ingress.schemas import (
    Image2ImageRequest,
    Image2ImageResponse,
    ReadyResponse,
    Text2ImageRequest,
    Text2ImageResponse,
    error_responses,
)
from serve_app.ingress.streaming import StepRecords, generation_events, job_events
from serve_app.jobs.broker import JobQueue, RedisKeys, keys_url
from serve_app.jobs.records import Image2ImageJobRequest, JobRequest
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


def _image_body_schema(model: type[Text2ImageRequest]) -> dict[str, Any]:
    """JSON with the image in base64, or multipart/form-data with the image as a file."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    form = {**schema, "properties": {**schema["properties"],
                                     "image": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": form}}}}


def _openai_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    generation = OpenAIImageRequest.model_json_schema(
        ref_template="#/components/schemas/{model}")
    edit = OpenAIEditRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    edit["properties"]["image"] = {"type": "string", "format": "binary"}
    return ({"requestBody": {"required": True,
                             "content": {"application/json": {"schema": generation}}}},
            {"requestBody": {"required": True,
                             "content": {"multipart/form-data": {"schema": edit}}}})


_OPENAI_GENERATION_SCHEMA, _OPENAI_EDIT_SCHEMA = _openai_schemas()
# What OpenAI's SDKs parse: ImagesResponse.
_OPENAI_IMAGES_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "OpenAI's ImagesResponse: `created` and `data`, one `{url}` or "
                   "`{b64_json}` per image."}}
_EVENT_STREAM: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-Sent Events: `progress` per denoising step (`step`, `steps`, "
                   "`elapsedSeconds`, `preview` when asked for), then `result` (the JSON "
                   "body the plain endpoint returns) or `error`.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_REQUEST_BODY_SCHEMA = _body_schema(Text2ImageRequest)
_IMAGE_BODY_SCHEMA = _image_body_schema(Image2ImageRequest)
_JOB_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"anyOf": [
        model.model_json_schema(ref_template="#/components/schemas/{model}")
        for model in (JobRequest, Image2ImageJobRequest)]}}}}}


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
        self.openai = OpenAIImagesService(self.generation, self.store, self.config)

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
            "backendReason": info.get("backend_reason"),
            "dtype": info.get("dtype"),
            "dtypeReason": info.get("dtype_reason"),
            "profile": info.get("profile"),
            "parts": info.get("parts"),
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
        return await self._generate_response(body, request)

    async def _generate_response(self, body: Text2ImageRequest,
                                 request: Request) -> JSONResponse:
        request_id = uuid.uuid4().hex
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        timings: dict[str, float] = {}
        response = await self.generation.generate(body, request_id, seed,
                                                  self._base_url(request), timings=timings)
        # No X-Request-ID of ours: Ray Serve's proxy sets that header (the client's own, or
        # its trace id) and logs it beside our id; a second value would contradict it.
        return JSONResponse(response, headers={"Server-Timing": server_timing(timings)})

    async def _read_body(self, request: Request, limit: int | None = None) -> bytes:
        if limit is None:
            return await read_body(request.stream(), request.headers.get("content-length"))
        return await read_body(request.stream(), request.headers.get("content-length"), limit)

    async def _image_request(self, request: Request) -> Image2ImageRequest:
        """JSON (image in base64) or multipart/form-data (image as a file part)."""
        limits = self.config.limits
        body = await self._read_body(request, image_body_limit(limits))
        content_type = request.headers.get("content-type")
        if is_multipart(content_type):
            data = await parse_form(body, content_type or "", "image", limits)
        else:
            data = load_json_object(body)
        return validate_request(data, self.config, Image2ImageRequest)

    @app.post(
        "/api/image2image",
        response_model=Image2ImageResponse,
        openapi_extra=_IMAGE_BODY_SCHEMA,
        responses=error_responses(401, 413, 422, 500, 501, 503, 504),
    )
    async def image2image(self, request: Request) -> JSONResponse:
        """Image-to-image: the text-to-image fields plus `image` and `strength`. The input
        image is fitted to `size` (scaled to cover it, centre-cropped) and never stored."""
        self._authorize(request)
        return await self._generate_response(await self._image_request(request), request)

    @app.post("/api/text2image/stream", response_class=StreamingResponse,
              openapi_extra=_REQUEST_BODY_SCHEMA,
              responses={**_EVENT_STREAM, **error_responses(401, 413, 422)})
    async def text2image_stream(self, request: Request,
                                preview: bool = False) -> StreamingResponse:
        """/api/text2image as Server-Sent Events; `?preview=true` adds a small preview
        image to the step events (computed only then)."""
        self._authorize(request)
        body = parse_request(await self._read_body(request), self.config)
        return self._stream(body, request, preview)

    @app.post("/api/image2image/stream", response_class=StreamingResponse,
              openapi_extra=_IMAGE_BODY_SCHEMA,
              responses={**_EVENT_STREAM, **error_responses(401, 413, 422)})
    async def image2image_stream(self, request: Request,
                                 preview: bool = False) -> StreamingResponse:
        """/api/image2image as Server-Sent Events (see /api/text2image/stream)."""
        self._authorize(request)
        body = await self._image_request(request)
        return self._stream(body, request, preview)

    def _stream(self, body: Text2ImageRequest, request: Request,
                preview: bool) -> StreamingResponse:
        """Validation errors were raised before this (plain JSON 4xx); from here on,
        errors are `error` events of a 200 stream."""
        request_id = uuid.uuid4().hex
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        base_url = self._base_url(request)

        def run() -> Any:
            return self.generation.generate(body, request_id, seed, base_url,
                                            progress_key=request_id, preview=preview)
        events = generation_events(run, StepRecords(self.store, request_id, body.number),
                                   steps_per_call(body), preview)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/api/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={**_EVENT_STREAM, **error_responses(401, 404)})
    async def job_event_stream(self, job_id: str, request: Request) -> StreamingResponse:
        """A job's progress as Server-Sent Events, from its status: `progress` when it
        changes (with `status`, `done`, `total`), then `result` (the job record) or
        `error`. No previews."""
        self._authorize(request)
        first = await self.jobs.status(job_id)  # 404 before any event
        return StreamingResponse(job_events(lambda: self.jobs.status(job_id), first),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/api/jobs", status_code=202, openapi_extra=_JOB_BODY_SCHEMA,
              responses={200: {"description": "The job this Idempotency-Key already made."},
                         **error_responses(401, 413, 422, 503)})
    async def submit_job(self, request: Request) -> JSONResponse:
        """Queue a generation; poll the status URL, or get a POST at `callbackUrl`."""
        self._authorize(request)
        raw = await self._read_body(request, image_body_limit(self.config.limits))
        data = load_json_object(raw)
        # With an `image`, an image-to-image job; otherwise the 64 KiB limit holds.
        model: type[JobRequest] = Image2ImageJobRequest if "image" in data else JobRequest
        if model is JobRequest and len(raw) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"body is larger than {MAX_BODY_BYTES} bytes", field="body")
        body = validate_request(data, self.config, model)
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

    # OpenAI-compatible Images API (openai_api.py). Errors here take OpenAI's shape
    # (serve_app/errors.py).

    @app.get("/v1/models", responses=openai_error_responses(401))
    async def openai_models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(self.openai.models())

    @app.get("/v1/models/{model_id:path}", responses=openai_error_responses(401, 404))
    async def openai_model(self, model_id: str, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(self.openai.model(model_id))

    @app.post("/v1/images/generations", openapi_extra=_OPENAI_GENERATION_SCHEMA,
              responses={**_OPENAI_IMAGES_RESPONSE,
                         **openai_error_responses(400, 401, 413, 500, 503, 504)})
    async def openai_generations(self, request: Request) -> JSONResponse:
        """OpenAI's images.generate: text-to-image."""
        self._authorize(request)
        body = validate_fields(load_json_object(await self._read_body(request)),
                               OpenAIImageRequest)
        return JSONResponse(await self._openai_images(body, request))

    @app.post("/v1/images/edits", openapi_extra=_OPENAI_EDIT_SCHEMA,
              responses={**_OPENAI_IMAGES_RESPONSE,
                         **openai_error_responses(400, 401, 413, 500, 501, 503, 504)})
    async def openai_edits(self, request: Request) -> JSONResponse:
        """OpenAI's images.edit (multipart, as the SDKs send it): image-to-image."""
        self._authorize(request)
        limits = self.config.limits
        raw = await self._read_body(request, image_body_limit(limits))
        content_type = request.headers.get("content-type")
        if not is_multipart(content_type):
            raise InvalidRequest("send multipart/form-data with the image as a file part",
                                 field="body")
        data = await parse_form(raw, content_type or "", "image", limits)
        if "image" in data:
            data["image"] = base64.b64decode(data["image"])
        body = validate_fields(data, OpenAIEditRequest)
        return JSONResponse(await self._openai_images(body, request))

    async def _openai_images(self, body: OpenAIImageRequest,
                             request: Request) -> dict[str, Any]:
        native = self.openai.to_request(body)
        request_id = uuid.uuid4().hex
        seed = native.seed if native.seed is not None else secrets.randbelow(2**31)
        generated = await self.generation.generate(native, request_id, seed,
                                                   self._base_url(request))
        return await self.openai.respond(body, generated)
