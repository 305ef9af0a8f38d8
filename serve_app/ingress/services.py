"""What the HTTP routes stand on: the services of one ingress replica (generation, jobs,
the OpenAI translation, the store, readiness) and the two things every route does first
(authorize, find the public base URL). Built by the Ingress deployment; the routes reach it
through `services(request)` (FastAPI's Depends)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import Request

from serve_app.config import AppConfig
from serve_app.generation.service import GenerationService
from serve_app.ingress.auth import ApiKeys
from serve_app.ingress.openai_api import OpenAIImagesService
from serve_app.ingress.readiness import ReadinessProbe
from serve_app.jobs.service import JobService
from serve_app.store import ImageStore


@dataclass
class IngressServices:
    config: AppConfig
    api_keys: ApiKeys | None
    store: ImageStore
    generation: GenerationService
    jobs: JobService
    openai: OpenAIImagesService
    readiness: ReadinessProbe
    # Confidential mode's protections of data leaving the TEE, as /readyz shows them
    # (serve_app/confidential.py).
    protections: dict[str, Any] = field(default_factory=dict)

    def authorize(self, request: Request, *, image: bool = False) -> None:
        if self.api_keys is None or (image and not self.config.security.protect_images):
            return
        self.api_keys.check(request.headers.get("authorization"))

    def base_url(self, request: Request) -> str:
        base = self.config.ingress.public_base_url or str(request.base_url)
        return base.rstrip("/")


def services(request: Request) -> IngressServices:
    """The replica's services, for a route (`svc: IngressServices = Depends(services)`)."""
    return request.app.state.services


# A route's parameter `svc: Services` is the replica's services.
Services = Annotated[IngressServices, Depends(services)]
