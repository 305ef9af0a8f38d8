"""Several models in one model replica (Ray Serve model multiplexing): loading one model's
generator, and what the replica holds.

The replica (serve_app/model/deployment.py) loads models through a function decorated with
`@serve.multiplexed(max_num_models_per_replica=...)`: Ray keeps the loaded models in LRU
order, evicts the least recently used past the count, and tells the router which models a
replica holds. This module is the plain part: which generator a model id loads
(`load_model_generator`), the object Ray holds (`LoadedModel`, whose `__del__` Ray calls on
eviction), and the replica's own account of what it holds and how much memory that takes
(`HeldModels`), which decides evictions for the memory budget (replica.models_memory_gib).
No Ray here, so it is tested directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import AppConfig
from serve_app.model.generator import ImageGenerator
from serve_app.plugins import load_factory

logger = logging.getLogger("ray.serve")


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded in this replica (the message is safe to
    show: it names the model and the reason, never a path's contents or a trace)."""


def load_model_generator(config: AppConfig, model_id: str) -> ImageGenerator:
    """The generator of one configured model: model.generator's factory (the same for every
    model) given the config with `model` set to that model (AppConfig.for_model). Blocking:
    the replica runs it off its event loop."""
    models = config.resolved_models()
    if model_id not in models:
        raise ModelLoadError(f"model {model_id!r} is not configured here "
                             f"(models: {list(models)})")
    model = models[model_id]
    # The model's LoRA adapters travel in its config (model.loras): the generator applies
    # them (serve_app/model/lora.py, from serve_app.model.pipeline.load_generator).
    factory = load_factory(model.generator)
    return factory(config.for_model(model_id))


class LoadedModel:
    """A loaded model as Ray's multiplexer holds it. Ray calls `__del__` when it evicts the
    model (so does the garbage collector, later): the first call reports the eviction, the
    generator is dropped, and later calls do nothing."""

    def __init__(self, model_id: str, generator: ImageGenerator,
                 on_evicted: Callable[[str], None]) -> None:
        self.model_id = model_id
        self.generator: ImageGenerator | None = generator
        self._on_evicted: Callable[[str], None] | None = on_evicted
        self._lock = threading.Lock()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ did not finish
            return
        with lock:
            callback, self._on_evicted = self._on_evicted, None
            self.generator = None
        if callback is not None:
            try:
                callback(self.model_id)
            except Exception:  # __del__ must not raise (Ray's unload logs and goes on)
                logger.exception("model %s: eviction bookkeeping failed", self.model_id)


@dataclass
class HeldModels:
    """The models a replica holds and their memory (each model's memory_gib or estimate),
    in load order. Ray's multiplexer owns the LRU order; this is the replica's account of
    sizes (Ray knows none) and what /readyz shows. Thread-safe: Ray calls `__del__` of an
    evicted model in a worker thread."""

    budget_gib: float | None = None
    _held: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, model_id: str, gib: float) -> None:
        with self._lock:
            self._held[model_id] = gib

    def remove(self, model_id: str) -> bool:
        with self._lock:
            return self._held.pop(model_id, None) is not None

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def total_gib(self) -> float:
        with self._lock:
            return sum(self._held.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def fits(self, gib: float) -> bool:
        """Whether a model of `gib` fits beside what is held (always, without a budget)."""
        if self.budget_gib is None:
            return True
        return self.total_gib() + gib <= self.budget_gib

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"held": list(self._held), "held_gib": round(sum(self._held.values()), 3),
                    "budget_gib": self.budget_gib}
