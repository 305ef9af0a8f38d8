"""Typed service errors and their one mapping to HTTP responses.

Clients get a JSON body with a code, a message and, where it applies, the field or the
request id. Never a stack trace: unexpected exceptions become `internal_error`. Under /v1/
(the OpenAI-compatible API) the same errors take OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`, and 422 becomes 400, so the OpenAI SDKs raise their usual
exceptions (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from serve_app.metrics import record_error

logger = logging.getLogger("ray.serve")


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.request_id = request_id

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class InvalidImage(InvalidRequest):
    """An image-to-image input that is not a PNG or JPEG within the limits, or does not
    decode (truncated, corrupt)."""

    code = "invalid_image"


class UnknownModel(InvalidRequest):
    """A request names a model this service does not serve: the message lists the valid
    ids (422; 400 on /v1)."""

    code = "unknown_model"


class ImageUrlRefused(InvalidRequest):
    """An `imageUrl` this service may not fetch: not http(s), a host outside
    ingress.image_url.hosts, an address inside the service's network, or a redirect to
    any of these or one too many. Sending it again changes nothing."""

    code = "image_url_refused"


class ImageUrlFailed(InvalidRequest):
    """An allowed `imageUrl` that gave no image: no connection, an HTTP error status, a
    body cut short, or not all of it within ingress.image_url.timeout_s. The client's
    input, not this service's fault (so 422, not 502/504)."""

    code = "image_url_failed"


class NotSupported(ServiceError):
    """A feature the serving backend lacks (image-to-image on OpenVINO)."""

    status_code = 501
    code = "not_supported"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status_code = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}


class HTTPStatusError(ServiceError):
    """Any other status the HTTP framework raises itself (not one of ours)."""

    code = "http_error"

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class RetryLater(ServiceError):
    """A 503/504 worth sending again later: the response says when (Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: int, request_id: str | None = None):
        super().__init__(message, request_id=request_id)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(RetryLater):
    status_code = 503
    code = "overloaded"


class JobsUnavailable(RetryLater):
    """The job queue (broker) or its key store cannot be reached: nothing was queued."""

    status_code = 503
    code = "jobs_unavailable"


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"


class GenerationTimeout(RetryLater):
    # Most often no model replica took the call in time (all busy, or being replaced after
    # their node was lost): worth sending again, later.
    status_code = 504
    code = "timeout"


class ReplicaLost(RetryLater):
    """The replica that held the call died (its process or its whole node) and none took
    the call in its place: Serve starts another, so the client sends again later."""

    status_code = 503
    code = "replica_lost"


class GenerationFailed(ServiceError):
    status_code = 500
    code = "generation_failed"


class ModelUnavailable(ServiceError):
    """A configured model could not be loaded in a model replica (its weights are missing,
    or it names adapters this build cannot apply): the replica's log says why."""

    status_code = 500
    code = "model_unavailable"


def error_body(err: ServiceError) -> dict[str, Any]:
    detail: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.field is not None:
        detail["field"] = err.field
    if err.request_id is not None:
        detail["requestId"] = err.request_id
    return {"status": "error", "error": detail}


# OpenAI answers invalid parameters with 400 where this API says 422.
OPENAI_STATUS = {422: 400}
OPENAI_PREFIX = "/v1/"


def openai_error_body(err: ServiceError) -> dict[str, Any]:
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    return {"error": {"message": err.message, "type": kind, "param": err.field,
                      "code": err.code}}


def is_openai_path(request: Request | None) -> bool:
    """Under /v1/ of this application, wherever Serve mounted it (its route prefix is the
    ASGI root_path)."""
    if request is None:
        return False
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.startswith(OPENAI_PREFIX)


def to_response(err: ServiceError, request: Request | None = None) -> JSONResponse:
    if is_openai_path(request):
        return JSONResponse(openai_error_body(err),
                            status_code=OPENAI_STATUS.get(err.status_code, err.status_code),
                            headers=err.headers())
    return JSONResponse(error_body(err), status_code=err.status_code, headers=err.headers())


def field_of(loc: tuple[Any, ...]) -> str:
    """Pydantic error location -> dotted field name ('body' prefix dropped)."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def install_error_handlers(app: FastAPI) -> None:
    """Every error a client can see, as the JSON body above and counted in
    ray_sdxl_errors_total: typed errors, routing errors (unknown path, wrong method),
    FastAPI's own validation errors, and anything unexpected (logged with an id, never
    shown)."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        record_error(exc.code)
        return to_response(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and wrong methods, raised by the router before any endpoint runs:
        the same JSON error body and error metric as every other error."""
        if exc.status_code == 405:
            err: ServiceError = MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}",
                allow=(exc.headers or {}).get("Allow"))
        elif exc.status_code == 404:
            err = NotFound(f"no endpoint at {request.url.path}")
        else:
            err = HTTPStatusError(str(exc.detail), status_code=exc.status_code)
        record_error(err.code)
        return to_response(err, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if errors := exc.errors():
            message, loc = str(errors[0]["msg"]), tuple(errors[0]["loc"])
        else:
            message, loc = "invalid request", ()
        record_error(InvalidRequest.code)
        return to_response(InvalidRequest(message, field=field_of(loc)), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex
        logger.exception("unhandled error, request %s", request_id)
        record_error(ServiceError.code)
        return to_response(ServiceError("internal error", request_id=request_id), request)
