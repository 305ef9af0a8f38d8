"""/readyz without making the probe wait on the model.

Kubernetes gives a readiness probe 1 s by default. While the model loads, a call to a
replica waits for it, so the probe must not: an ask for the replica's info runs in the
background, and each probe reports what is known, waiting at most `wait_s` and only when it
started the ask itself. Plain asyncio, no Ray: the ingress passes its model call in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["ready", "busy", "loading", "unavailable"]


@dataclass(frozen=True)
class Readiness:
    state: State
    # The replica's info: fresh when ready, the last one seen when busy.
    info: dict[str, Any] | None = None
    detail: str = ""


class ReadinessProbe:
    def __init__(self, ask: Callable[[], Awaitable[dict[str, Any]]], *,
                 busy_errors: tuple[type[BaseException], ...] = (),
                 wait_s: float = 0.5, give_up_s: float = 3.0,
                 replicas: Callable[[], int | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ask = ask
        # Model replicas known to be running (None: not known). An unanswered ask means a
        # busy replica only while there is one: with none (its node lost), not ready.
        self._replicas = replicas
        # Errors that mean "replicas are there but saturated" (Serve's back-pressure).
        self._busy_errors = busy_errors
        self.wait_s = wait_s
        # An ask unanswered this long is abandoned and asked again (a lost call).
        self.give_up_s = give_up_s
        self._clock = clock
        self._pending: asyncio.Future | None = None
        self._asked_at = 0.0
        self.info: dict[str, Any] | None = None

    def start(self) -> None:
        """Ask now, in the background (from the ingress's start-up: the first call through a
        Serve handle sets up its router, which should not happen inside a probe)."""
        if self._pending is None:
            self._ask_now()

    def _ask_now(self) -> asyncio.Future:
        self._pending = pending = asyncio.ensure_future(self._ask())
        self._asked_at = self._clock()
        return pending

    async def check(self) -> Readiness:
        if self._pending is not None and self._clock() - self._asked_at > self.give_up_s:
            self._pending.cancel()
            self._pending = None
        wait = 0.0
        pending = self._pending
        if pending is None:
            pending = self._ask_now()
            wait = self.wait_s
        done, _ = await asyncio.wait({pending}, timeout=wait)
        if not done:
            return self._waiting()
        if self._pending is pending:
            self._pending = None
        try:
            info = pending.result()
        except self._busy_errors:
            return self._waiting()
        except Exception as exc:
            return Readiness("unavailable", detail=type(exc).__name__)
        self.info = info
        return Readiness("ready", info)

    def _waiting(self) -> Readiness:
        # A replica that answered before and is now busy generating is still ready.
        if self.info is not None:
            if self._replicas is not None and self._replicas() == 0:
                return Readiness("unavailable", detail="no model replica running")
            return Readiness("busy", self.info)
        return Readiness("loading")
