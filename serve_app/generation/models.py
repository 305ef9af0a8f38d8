"""The served models as requests see them: which names a request may give in `model`, the
model id each stands for, and the model list of /v1/models and /readyz.

Plain functions over the config (no Ray, no torch): the HTTP routes, the OpenAI
translation, job submission and the job runner all resolve a request's model here.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import UnknownModel

# Names OpenAI-style clients used for the one model before there were several: they name
# the default model (unless a model has that id).
DEFAULT_ALIASES = ("sdxl-turbo",)


class ModelCatalog:
    """The configured models by id (the default first) and the names that resolve to them:
    each id; the default's aliases; a model's source where no other model has it (what
    /v1/models listed before models had ids, so such clients keep working)."""

    def __init__(self, config: AppConfig) -> None:
        self.models: dict[str, ModelConfig] = config.resolved_models()
        self.default = config.default_model_id
        self._names: dict[str, str] = {}
        sources = [model.source for model in self.models.values()]
        for model_id, model in self.models.items():
            if sources.count(model.source) == 1 and model.source not in self.models:
                self._names[model.source] = model_id
        for alias in DEFAULT_ALIASES:
            if alias not in self.models:
                self._names[alias] = self.default
        self._names.update({model_id: model_id for model_id in self.models})

    @property
    def ids(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str | None) -> str:
        """The model id a request's `model` names (absent: the default); UnknownModel (422;
        400 on /v1) naming the valid ids otherwise."""
        if name is None:
            return self.default
        model_id = self._names.get(name)
        if model_id is None:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise UnknownModel(f"model {shown!r} is not served here; valid ids: {self.ids}",
                               field="model")
        return model_id

    def listing(self, loaded: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Per model: id, whether it is the default, where its weights come from (embedded,
        directory or hub: never the path), its LoRA adapters' count; with `loaded` (a model
        replica's info: models it holds), whether that replica holds it and on what."""
        out = []
        for model_id, model in self.models.items():
            entry: dict[str, Any] = {"id": model_id, "default": model_id == self.default,
                                     "source": model.source_kind, "loras": len(model.loras)}
            if loaded is not None:
                held = loaded.get(model_id)
                entry["loaded"] = held is not None
                if held:
                    entry.update({k: held[k] for k in ("backend", "dtype") if held.get(k)})
            out.append(entry)
        return out


# Re-entrant: a config dying (its weakref callback) while a catalog is being built.
_lock = threading.RLock()
# id(config) -> (a weak reference to that config, its catalog): one catalog per config
# object, built on first use (resolving the models validates each one).
_catalogs: dict[int, tuple[weakref.ref[AppConfig], ModelCatalog]] = {}


def catalog_of(config: AppConfig) -> ModelCatalog:
    key = id(config)
    with _lock:
        cached = _catalogs.get(key)
        if cached is not None and cached[0]() is config:
            return cached[1]
        catalog = ModelCatalog(config)
        _catalogs[key] = (weakref.ref(config, lambda _: _forget(key)), catalog)
        return catalog


def _forget(key: int) -> None:
    with _lock:
        _catalogs.pop(key, None)
