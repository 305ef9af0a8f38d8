"""The OpenAPI side of the HTTP bodies: error responses and /readyz, as the service sends
them (serve_app.errors.error_body, the readyz route)."""

import ast
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.errors import (
    GenerationFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotReady,
    Overloaded,
    error_body,
    install_error_handlers,
)
from serve_app.generation.schemas import (
    ERROR_DESCRIPTIONS,
    ErrorDetail,
    ErrorResponse,
    ReadyResponse,
    error_responses,
)

DEPLOYMENT = Path(__file__).parents[2] / "serve_app" / "ingress" / "routes" / "native.py"


def test_error_responses_give_the_error_body_and_a_description_per_status():
    assert error_responses(422, 503) == {
        422: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[422]},
        503: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[503]},
    }
    assert error_responses() == {}
    assert sorted(ERROR_DESCRIPTIONS) == [401, 404, 413, 422, 500, 501, 503, 504]
    assert ERROR_DESCRIPTIONS[422].startswith("`invalid_request`: ")


def test_error_responses_refuse_a_status_without_a_description():
    with pytest.raises(ValueError) as info:
        error_responses(422, 418, 302)
    assert str(info.value) == "no error documented for status [302, 418]"


@pytest.mark.parametrize("err", [
    InvalidRequest("step must be <= 50", field="step"),
    GenerationFailed("image generation failed", request_id="0" * 32),
    Overloaded("busy", retry_after_s=1, request_id="1" * 32),
    MethodNotAllowed("GET is not allowed on /api/text2image", allow="POST"),
    NotReady("model is loading"),
])
def test_error_response_describes_every_error_body(err):
    body = error_body(err)
    parsed = ErrorResponse.model_validate(body)
    assert parsed.model_dump(exclude_none=True) == body
    assert set(body["error"]) <= set(ErrorDetail.model_fields)


def test_openapi_documents_the_error_body_for_each_status():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/thing", responses=error_responses(413, 422))
    async def thing() -> dict:
        raise InvalidRequest("no", field="prompt")

    client = TestClient(app)
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/thing"]["post"]["responses"]
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    assert responses["413"] == {"description": ERROR_DESCRIPTIONS[413], "content": ref}
    assert responses["422"] == {"description": ERROR_DESCRIPTIONS[422], "content": ref}
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert schemas["ErrorResponse"]["properties"]["status"]["const"] == "error"
    assert schemas["ErrorDetail"]["required"] == ["code", "message"]
    assert set(schemas["ErrorDetail"]["properties"]) == {"code", "message", "field",
                                                         "requestId"}
    # What the route really sends matches what is documented.
    response = client.post("/thing")
    assert response.status_code == 422
    assert ErrorResponse.model_validate(response.json()).model_dump(exclude_none=True) == {
        "status": "error",
        "error": {"code": "invalid_request", "message": "no", "field": "prompt"}}


def _readyz_body_keys() -> tuple[list[str], list[str]]:
    """The keys of the dict the readyz route returns, and of its `optimizations`."""
    tree = ast.parse(DEPLOYMENT.read_text())
    [route] = [node for node in ast.walk(tree)
               if isinstance(node, ast.AsyncFunctionDef) and node.name == "readyz"]
    [body] = [node for node in ast.walk(route) if isinstance(node, ast.Dict)
              and any(isinstance(k, ast.Constant) and k.value == "status" for k in node.keys)]
    keys = [k.value for k in body.keys if isinstance(k, ast.Constant)]
    [optimizations] = [v for k, v in zip(body.keys, body.values)
                       if isinstance(k, ast.Constant) and k.value == "optimizations"]
    assert isinstance(optimizations, ast.Dict)
    return keys, [k.value for k in optimizations.keys if isinstance(k, ast.Constant)]


def test_ready_response_has_the_fields_of_the_readyz_route():
    keys, optimization_keys = _readyz_body_keys()
    assert list(ReadyResponse.model_fields) == keys
    assert list(ReadyResponse.model_fields["optimizations"].annotation.model_fields) == (
        optimization_keys)


def test_ready_response_reads_a_real_readyz_body():
    body = {"status": "ready", "busy": False, "model": "embedded:tiny-sdxl",
            "backend": "torch", "backendReason": "auto: OpenVINO not measured on avx512 CPUs",
            "dtype": "float32", "dtypeReason": "no native bf16", "profile": "fast",
            "parts": {"unet": "float32", "vae": "tiny (embedded:tiny-taesd)"},
            "cpu": "x86_64 avx2", "device": "cpu", "threads": 2, "tee": None,
            "protections": {"confidential": False, "brokerTls": "none",
                            "storeEncryption": "none", "storeTls": False, "acceptedRisks": []},
            "optimizations": {"applied": ["fuse_attention"],
                              "skipped": {"prepack_conv": "needs oneDNN bf16"}},
            "warnings": [],
            "models": [{"id": "sdxl-turbo", "default": True, "source": "embedded", "loras": 0,
                        "loaded": True, "backend": "torch", "dtype": "float32"}]}
    assert ReadyResponse.model_validate(body).model_dump() == body
    with pytest.raises(ValueError):
        ReadyResponse.model_validate({**body, "status": "not_ready"})
