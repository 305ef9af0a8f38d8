"""HTTP request and response bodies: the wire format of the stable-diffusion-ipex API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

MAX_SEED = 2**63 - 1
# Longer URLs are refused as a field error, before anything is fetched (browsers and most
# servers stop near 8 KB; presigned object-store URLs run to about 2 KB).
MAX_IMAGE_URL_CHARS = 8192
REF_TEMPLATE = "#/components/schemas/{model}"


@dataclass(frozen=True)
class BodyFormat:
    """How a request model arrives over HTTP (serve_app.ingress.parsing.read_request):
    `json` (the Content-Type is then ignored: `curl -d` sends form-urlencoded), `multipart`
    (multipart/form-data with the image as a file part), and whether it may carry an input
    `image` (bodies without one are held to 64 KiB), and whether the model takes that
    image base64-encoded (as in JSON) or as the file part's raw bytes."""

    json: bool = True
    multipart: bool = False
    image: bool = False
    image_base64: bool = True


JSON_BODY = BodyFormat()
BINARY = {"type": "string", "format": "binary"}


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """FastAPI's `openapi_extra` for a route whose body is one of `models` (several: the
    one that fits, by whether an image is given), in the formats they accept."""
    formats = [getattr(model, "body_format", JSON_BODY) for model in models]
    schemas = [model.model_json_schema(ref_template=REF_TEMPLATE) for model in models]
    content: dict[str, Any] = {}
    if any(f.json for f in formats):
        json_schemas = [s for s, f in zip(schemas, formats) if f.json]
        content["application/json"] = {
            "schema": json_schemas[0] if len(json_schemas) == 1 else {"anyOf": json_schemas}}
    forms = [{**s, "properties": {**s["properties"], "image": BINARY}}
             for s, f in zip(schemas, formats) if f.multipart]
    if forms:
        content["multipart/form-data"] = {
            "schema": forms[0] if len(forms) == 1 else {"anyOf": forms}}
    return {"requestBody": {"required": True, "content": content}}


class Text2ImageRequest(BaseModel):
    # Unknown fields are rejected (422 naming the field): a typo such as "steps" must not
    # silently fall back to a default.
    model_config = ConfigDict(extra="forbid")
    body_format: ClassVar[BodyFormat] = JSON_BODY

    prompt: str = Field(min_length=1, description="Text prompt. Tokens past 77 are truncated.")
    number: int = Field(default=1, ge=1, le=64, strict=True,
                        description="Pipeline calls; each yields `batch` images.")
    size: str = Field(default="512x512", description="WIDTHxHEIGHT, one of the allowed sizes.")
    step: int = Field(default=4, ge=1, le=1000, strict=True, description="Denoising steps.")
    batch: int = Field(default=1, ge=1, le=64, strict=True, description="Images per call.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True,
                             description="Same seed, prompt and parameters give the same bytes.")
    model: str | None = Field(default=None, max_length=200,
                              description="The model's id (GET /v1/models, /readyz); absent: "
                                          "the default model.")

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt: str) -> str:
        if "\x00" in prompt:
            raise ValueError("prompt must not contain NUL characters")
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt


class Image2ImageRequest(Text2ImageRequest):
    """The text-to-image fields plus an input image and how strongly to change it."""

    body_format: ClassVar[BodyFormat] = BodyFormat(multipart=True, image=True)
    # Exactly one of image and imageUrl (serve_app.generation.requests.check_image_request);
    # documented as the string it is when given.
    image: Annotated[Base64Bytes | None, WithJsonSchema({"type": "string",
                                                         "format": "base64"})] = Field(
        default=None,
        description="The input image, PNG or JPEG, base64-encoded (a `data:image/...;base64,` "
                    "prefix is allowed). Multipart requests send it as a file part instead. "
                    "Fitted to `size` (scaled to cover it, centre-cropped). Or `imageUrl`.")
    imageUrl: str | None = Field(
        default=None, max_length=MAX_IMAGE_URL_CHARS,
        description="Instead of `image`: an http(s) URL the service fetches the input image "
                    "from (public addresses only, a few redirects, within a size and a time "
                    "limit), then checks as an uploaded one.")
    strength: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="How much of the input is replaced: 1.0 keeps nothing of it. About "
                    "`step x strength` denoising steps run; that must be at least 1.")

    @field_validator("image", mode="before")
    @classmethod
    def _strip_data_url(cls, value: object) -> object:
        if isinstance(value, str) and value.startswith("data:") and "," in value:
            return value.split(",", 1)[1]
        return value


class InputMeta(BaseModel):
    batch: int
    # The model's source (hub id, directory or embedded name), as before there were several.
    model: str
    # The id of the model that made the images (the request's `model`, or the default).
    modelId: str
    number: int
    prompt: str
    size: str
    step: int
    seed: int


class Meta(BaseModel):
    input: InputMeta


class Image2ImageInputMeta(InputMeta):
    strength: float


class Image2ImageMeta(Meta):
    input: Image2ImageInputMeta


class OutputImage(BaseModel):
    latencySeconds: float
    url: str


class Text2ImageResponse(BaseModel):
    id: str
    averageImageGenerationTimeSeconds: float
    generationTimeSeconds: float
    meta: Meta
    output: list[OutputImage]
    # Set when number > 1: all images merged into one PNG under the same id.
    gridUrl: str | None = None
    status: Literal["success"] = "success"


class Image2ImageResponse(Text2ImageResponse):
    """The text-to-image response; `meta.input` also echoes `strength`."""

    meta: Image2ImageMeta


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_request`.")
    message: str = Field(description="What went wrong, for people.")
    # Present only where it applies (serve_app.errors.error_body leaves them out otherwise).
    field: str | None = Field(default=None,
                              description="The request field at fault (422), `body` for the "
                                          "body as a whole.")
    requestId: str | None = Field(default=None,
                                  description="Finds the failure in the service's logs (500).")


class ErrorResponse(BaseModel):
    """Every error body (serve_app.errors.error_body); never a stack trace."""

    status: Literal["error"] = "error"
    error: ErrorDetail


class Optimizations(BaseModel):
    applied: list[str] = Field(description="CPU speed levers in effect.")
    skipped: dict[str, str] = Field(description="Levers left off, with the reason.")


class Protections(BaseModel):
    confidential: bool = Field(description="security.require_tee is on.")
    brokerTls: Literal["verified", "unverified", "none"] | None = Field(
        description="TLS to the jobs' Redis (the weakest of broker and keys): verified "
                    "certificate, unverified, or none (clear text).")
    storeEncryption: str = Field(
        description="Server-side encryption asked for on every store write (aws:kms, "
                    "AES256) or none.")
    storeTls: bool = Field(description="The store is an s3:// bucket reached over https.")
    acceptedRisks: list[str] = Field(description="security.accept_risks.")


class ServedModel(BaseModel):
    """One served model (/readyz `models`, and the extra fields of /v1/models' entries)."""

    id: str = Field(description="What a request names in `model`.")
    default: bool = Field(description="Requests that name no model get this one.")
    source: Literal["embedded", "directory", "hub"] = Field(
        description="Where its weights come from (never the path).")
    loras: int = Field(description="LoRA adapters it applies.")
    loaded: bool | None = Field(
        default=None, description="/readyz: the model replica that answered holds it now "
                                  "(others may hold other models).")
    backend: str | None = Field(default=None, description="What it runs on, where loaded.")
    dtype: str | None = None


class ReadyResponse(BaseModel):
    """The /readyz body once a model replica has loaded and warmed up (the model replica's
    info; fields it did not report are null)."""

    status: Literal["ready"] = "ready"
    busy: bool = Field(description="The model replicas' queues are full right now.")
    model: str | None = None
    backend: str | None = None
    backendReason: str | None = Field(
        default=None, description="Why this backend: configured, or what `auto` measured.")
    dtype: str | None = None
    dtypeReason: str | None = None
    profile: Literal["quality", "fast"] | None = Field(
        default=None, description="model.profile: quality (the weights as they are, the "
                                  "full VAE) or fast (int8 weights, the tiny VAE).")
    parts: dict[str, str] | None = Field(
        default=None, description="What runs: `unet` (its weights: the dtype, or int8) and "
                                  "`vae` (full, or tiny with its source).")
    cpu: str | None = None
    device: str | None = None
    threads: int | None = None
    tee: str | None = None
    protections: Protections = Field(
        description="Confidential mode's protections of data leaving the TEE (README, "
                    "Security).")
    optimizations: Optimizations
    warnings: list[str]
    models: list[ServedModel] = Field(
        default_factory=list, description="The served models, the default first.")


# The errors each status carries (README, "Endpoints and errors").
ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "`unauthorized`: API keys are on and the bearer token is missing or wrong.",
    404: "`not_found`: unknown id or file, or a path that tries to leave the store.",
    413: "`payload_too_large`: the body is over 64 KiB (image-to-image: the image, sent or "
         "fetched from `imageUrl`, is over `limits.max_input_image_bytes`).",
    422: "`invalid_request`: a field is missing, mistyped or out of range (`field` names "
         "it), or the body is not UTF-8 JSON (`field: body`); `invalid_image`: the input "
         "image is not a PNG or JPEG, its sides are outside the limits, or it does not "
         "decode (`field: image`, or `imageUrl` for a fetched one); `image_url_refused`: "
         "`imageUrl` may not be fetched (scheme, host, an internal address, redirects); "
         "`image_url_failed`: it gave no image (no connection, an HTTP error, too slow); "
         "`unknown_model`: `model` names no served model (the message lists the valid ids).",
    501: "`not_supported`: the model's generator cannot do this (image-to-image with a "
         "custom `model.generator` that does not implement it; every shipped backend does).",
    500: "`generation_failed`: the pipeline failed; `requestId` finds it in the logs. "
         "`model_unavailable`: the named model could not be loaded (the model replica's "
         "log says why).",
    503: "`overloaded` (with `Retry-After`): the model replicas' queues are full; "
         "`not_ready` on /readyz: no model replica has loaded yet.",
    504: "`timeout`: generation took longer than `ingress.request_timeout_s`.",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI's `responses=` for these error statuses: each documented with the
    ErrorResponse body and what it means."""
    unknown = sorted(set(status_codes) - ERROR_DESCRIPTIONS.keys())
    if unknown:
        raise ValueError(f"no error documented for status {unknown}")
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]}
            for code in status_codes}
