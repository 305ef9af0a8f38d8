"""Denoising-step progress written to the store off the pipeline thread, latest value wins.

One writer thread, and per name only the newest value waiting: a slow write can never land
after a newer one (stepsDone never goes backwards), and a burst of steps while a write is in
flight costs one more write, not one per step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger("ray.serve")


class LatestValueWriter:
    def __init__(self, write: Callable[[str, bytes], None]) -> None:
        self._write = write
        self._pending: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")

    def submit(self, name: str, data: bytes) -> Future | None:
        """Queue `data` for `name`; returns the write's future, or None when a write of
        that name is already queued (it will carry this newer value)."""
        with self._lock:
            queued = name in self._pending
            self._pending[name] = data
        return None if queued else self._pool.submit(self._flush, name)

    def _flush(self, name: str) -> None:
        with self._lock:
            data = self._pending.pop(name)
        try:
            self._write(name, data)
        except Exception as exc:  # progress is advisory: the job's result does not depend on it
            logger.warning("progress write %s failed: %s", name, type(exc).__name__)

    def drain(self) -> None:
        """Wait until every queued write has run (tests, shutdown)."""
        self._pool.submit(lambda: None).result()
