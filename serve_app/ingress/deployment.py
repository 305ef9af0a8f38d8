"""The HTTP ingress: validation, ids, fan-out to the model, PNG encoding, the image store.

It imports no torch, diffusers or PIL: images arrive as uint8 arrays and are encoded here,
so the model replica goes on to its next batch while the ingress writes PNGs.
"""


import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import HTMLResponse, JSONResponse, Response

from serve_app.config import AppConfig
from serve_app.errors import (
    GenerationFailed,
    GenerationTimeout,
    InvalidRequest,
    NotReady,
    Overloaded,
    install_error_handlers,
    to_response,
)
from serve_app.ingress.auth import ApiKeys
from serve_app.ingress.head_requests import HeadAsGet
from serve_app.ingress.imaging import encode_png, make_grid
from serve_app.ingress.parsing import parse_request, plan_calls, read_body
from serve_app.ingress.readiness import ReadinessProbe
from serve_app.ingress.schemas import (
    Text2ImageRequest,
    Text2ImageResponse,
)
from serve_app.jobs.records import (
    JobRecord,
    JobRequest,
    Progress,
    callback_host_allowed,
    key_name,
    record_name,
)
from serve_app.jobs.runner import JobRunner, KeyedLocks
from serve_app.metrics import ingress_metrics, record_error
from serve_app.protocol import GenerationItem, ModelResult, Priority
from serve_app.store import GRID_NAME, ImageStore, image_name
from serve_app.tee import check_tee

logger = logging.getLogger("ray.serve")

# The most a /readyz waits for a model replica (Kubernetes' probe timeout is 1 s).
READY_PROBE_WAIT_S = 0.5
# A call whose replica died is sent again (to a live replica): seeded generation is
# idempotent, so the client gets its images instead of an error.
REPLICA_LOST_RETRIES = 2
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
class Ingress(JobRunner):
    def __init__(self, batcher: Any, model: Any, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        security = self.config.security
        self.tee = check_tee(security.require_tee, security.tee_probe)
        self.api_keys = ApiKeys.from_env(security.api_keys_env)
        # Generation goes through the batching deployment; the model is asked only for its
        # info (/readyz).
        self.batcher = batcher
        self.model = model
        store_cfg = self.config.store
        self.store = ImageStore(store_cfg.url, store_cfg.storage_options)
        self._readiness = ReadinessProbe(self._model_info, busy_errors=(BackPressureError,),
                                         wait_s=READY_PROBE_WAIT_S)
        self._readiness.start()
        self._stop = threading.Event()
        self._cleaner = threading.Thread(target=self._cleanup_loop, name="store-cleanup",
                                         daemon=True)
        self._cleaner.start()
        self._running_jobs: dict[str, asyncio.Task] = {}
        self._idempotency_locks = KeyedLocks()
        # Jobs whose ingress died (records gone stale) are picked up by a live one.
        self._job_scanner = asyncio.get_running_loop().create_task(self._scan_jobs_forever())

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

    @app.get("/readyz")
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
        responses={413: {}, 422: {}, 500: {}, 503: {}, 504: {}},
    )
    async def text2image(self, request: Request) -> JSONResponse:
        self._authorize(request)
        body = parse_request(await self._read_body(request), self.config)
        request_id = uuid.uuid4().hex
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        timings: dict[str, float] = {}
        response = await self._generate(body, request_id, seed, self._base_url(request),
                                        timings=timings)
        # No X-Request-ID of ours: Ray Serve's proxy sets that header (the client's own, or
        # its trace id) and logs it beside our id; a second value would contradict it.
        return JSONResponse(response, headers={"Server-Timing": server_timing(timings)})

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request.stream(), request.headers.get("content-length"))

    async def _generate(self, body: Text2ImageRequest, request_id: str, seed: int,
                        base_url: str,
                        on_call_done: Callable[[int], None] | None = None,
                        progress_key: str | None = None,
                        timings: dict[str, float] | None = None,
                        priority: Priority = "interactive") -> dict[str, Any]:
        """timings, when given, receives where the time went (seconds): `pipeline` (the
        longest pipeline call inside a model replica), `model` (model calls as the ingress
        saw them: queue, hops, pipeline), `store` (PNG encoding and storage)."""
        items = plan_calls(body, seed, progress_key, priority)
        started = time.perf_counter()
        results = await self._run_calls(items, request_id, on_call_done)
        generation_s = time.perf_counter() - started

        images = [result.images for result, _ in results]
        stored = time.perf_counter()
        await self._store_images(request_id, images)
        if timings is not None:
            timings["pipeline"] = max(result.pipeline_s for result, _ in results)
            timings["model"] = generation_s
            timings["store"] = time.perf_counter() - stored
        base = f"{base_url}/images/{request_id}"
        output = [
            {"latencySeconds": round(latency_s, 4), "url": f"{base}/{image_name(i, j)}"}
            for i, (result, latency_s) in enumerate(results)
            for j in range(len(result.images))
        ]
        total = len(output)
        logger.info("request %s: %d images %s %d steps in %.3fs", request_id, total, body.size,
                    body.step, generation_s)
        return Text2ImageResponse.model_validate({
            "id": request_id,
            "averageImageGenerationTimeSeconds": round(generation_s / total, 4),
            "generationTimeSeconds": round(generation_s, 4),
            "meta": {"input": {
                "batch": body.batch, "model": self.config.model.source, "number": body.number,
                "prompt": body.prompt, "size": body.size, "step": body.step, "seed": seed,
            }},
            "output": output,
            "gridUrl": f"{base}/{GRID_NAME}" if body.number > 1 else None,
            "status": "success",
        }).model_dump()

    async def _run_calls(self, items: list[GenerationItem], request_id: str,
                         on_call_done: Callable[[int], None] | None = None,
                         ) -> list[tuple[ModelResult, float]]:
        """Each call's result and its latency as the ingress saw it (seconds)."""
        async def one(item: GenerationItem) -> tuple[ModelResult, float]:
            start = time.perf_counter()
            for attempt in range(REPLICA_LOST_RETRIES + 1):
                try:
                    result: ModelResult = await self.batcher.generate.remote(item)
                    break
                except (RayActorError, ActorUnavailableError):
                    # The batcher replica died with the call (a model replica's death is
                    # handled in the batcher, which queues the batch again).
                    if attempt == REPLICA_LOST_RETRIES:
                        raise
                    logger.warning("request %s: batcher replica lost, retrying call %d",
                                   request_id, item.call_index)
            if result.error == "overloaded":
                raise Overloaded("all model replicas are busy and the batching queue is full",
                                 retry_after_s=self.config.ingress.retry_after_s,
                                 request_id=request_id)
            if on_call_done is not None and result.error is None:
                on_call_done(len(result.images))
            return result, time.perf_counter() - start

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks),
                                             self.config.ingress.request_timeout_s)
        except asyncio.TimeoutError:
            raise GenerationTimeout(
                f"generation took longer than {self.config.ingress.request_timeout_s}s",
                request_id=request_id) from None
        except Overloaded:
            for task in tasks:
                task.cancel()  # the request's other calls give their places back
            raise
        except Exception as exc:
            for task in tasks:
                task.cancel()
            logger.error("request %s: model call failed: %s", request_id, type(exc).__name__)
            raise GenerationFailed("image generation failed", request_id=request_id) from None
        for result, _ in results:
            if result.error is not None:
                logger.error("request %s: pipeline error %s", request_id, result.error)
                raise GenerationFailed("image generation failed", request_id=request_id)
        return results

    async def _store_images(self, request_id: str, images: list[list[Any]]) -> None:
        encode_metrics = ingress_metrics()

        def encode_and_put(name: str, pixels: Any) -> None:
            start = time.perf_counter()
            data = encode_png(pixels)
            encode_metrics.record_encode("grid" if name == GRID_NAME else "image",
                                         time.perf_counter() - start)
            self.store.put(request_id, name, data)

        jobs = [
            asyncio.to_thread(encode_and_put, image_name(i, j), pixels)
            for i, call_images in enumerate(images)
            for j, pixels in enumerate(call_images)
        ]
        if len(images) > 1:
            flat = [pixels for call_images in images for pixels in call_images]
            jobs.append(asyncio.to_thread(lambda: encode_and_put(GRID_NAME, make_grid(flat))))
        await asyncio.gather(*jobs)

    @app.post("/api/jobs", status_code=202, openapi_extra=_JOB_BODY_SCHEMA,
              responses={200: {}, 401: {}, 413: {}, 422: {}})
    async def submit_job(self, request: Request) -> JSONResponse:
        """Queue a generation; poll the status URL, or get a POST at `callbackUrl`."""
        self._authorize(request)
        body = parse_request(await self._read_body(request), self.config, JobRequest)
        if body.callbackUrl is not None and not callback_host_allowed(
                body.callbackUrl.host, self.config.jobs.callback_hosts):
            raise InvalidRequest("callbackUrl names a host this service may not call "
                                 "(jobs.callback_hosts)", field="callbackUrl")
        idempotency_key = request.headers.get("idempotency-key")
        if not idempotency_key:
            return await self._create_job(body, None, self._base_url(request))
        # Concurrent retries with one key create one job: serialised here on this replica,
        # and across replicas by creating the key's record only if it is absent.
        async with self._idempotency_locks.hold(idempotency_key):
            existing = await self._job_for_key(idempotency_key)
            if existing is not None:
                return JSONResponse(existing.public(), status_code=200)
            return await self._create_job(body, idempotency_key, self._base_url(request))

    async def _create_job(self, body: JobRequest, idempotency_key: str | None,
                          base: str) -> JSONResponse:
        job_id = uuid.uuid4().hex
        now = time.time()
        record = JobRecord(
            id=job_id, createdAt=now, updatedAt=now,
            request=body.model_dump(exclude={"callbackUrl"}),
            seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
            progress=Progress(total=body.number * body.batch,
                              stepsTotal=body.number * body.step),
            callbackUrl=str(body.callbackUrl) if body.callbackUrl else None,
            statusUrl=f"{base}/api/jobs/{job_id}",
        )
        await self._save_job(record)
        if idempotency_key and not await asyncio.to_thread(
                self.store.create_record, key_name(idempotency_key), job_id.encode()):
            # Another ingress replica claimed the key first; its job record was saved
            # before its claim, so it can be read now, and ours never runs.
            existing = await self._job_for_key(idempotency_key)
            if existing is not None:
                await asyncio.to_thread(self.store.delete_record, record_name(job_id))
                return JSONResponse(existing.public(), status_code=200)
            # The key names a job that is gone (expired): this one takes the key over.
            await asyncio.to_thread(self.store.put_record, key_name(idempotency_key),
                                    job_id.encode())
        self._start_job(record, base)
        return JSONResponse(record.public(), status_code=202,
                            headers={"Location": record.statusUrl or ""})

    @app.get("/api/jobs/{job_id}", responses={401: {}, 404: {}})
    async def job_status(self, job_id: str, request: Request) -> JSONResponse:
        self._authorize(request)
        record = await self._load_job(job_id)
        if record.status == "running":
            record.progress.stepsDone = await self._steps_done(record)
        return JSONResponse(record.public())

    @app.get("/images/{image_id}/{name}", responses={404: {}})
    async def image(self, image_id: str, name: str, request: Request) -> Response:
        self._authorize(request, image=True)
        data = await asyncio.to_thread(self.store.get, image_id, name)
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})
