"""HTTP request and response bodies: the wire format of the stable-diffusion-ipex API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1


class Text2ImageRequest(BaseModel):
    # Unknown fields are rejected (422 naming the field): a typo such as "steps" must not
    # silently fall back to a default.
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="Text prompt. Tokens past 77 are truncated.")
    number: int = Field(default=1, ge=1, le=64, strict=True,
                        description="Pipeline calls; each yields `batch` images.")
    size: str = Field(default="512x512", description="WIDTHxHEIGHT, one of the allowed sizes.")
    step: int = Field(default=4, ge=1, le=1000, strict=True, description="Denoising steps.")
    batch: int = Field(default=1, ge=1, le=64, strict=True, description="Images per call.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True,
                             description="Same seed, prompt and parameters give the same bytes.")

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt: str) -> str:
        if "\x00" in prompt:
            raise ValueError("prompt must not contain NUL characters")
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt


class InputMeta(BaseModel):
    batch: int
    model: str
    number: int
    prompt: str
    size: str
    step: int
    seed: int


class Meta(BaseModel):
    input: InputMeta


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


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    requestId: str | None = None


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    error: ErrorDetail


class ReadyResponse(BaseModel):
    status: str
    model: str | None = None
    backend: str | None = None
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
