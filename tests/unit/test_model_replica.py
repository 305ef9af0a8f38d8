"""The model replica (Text2ImageModel) holding several models, without a Ray cluster: the
class itself, in-process, with the fake generator and Ray Serve's own multiplex wrapper
(the installed Ray's `@serve.multiplexed`, given a stand-in replica context). Each batch
runs on its multiplexed model; Ray's count limit and the memory budget
(ray_compat.evict_least_recently_used) evict the least recently used models."""

import asyncio
import types
from unittest import mock

import pytest
import ray.serve.multiplex as multiplex
from ray.serve._private.common import DeploymentID, ReplicaID

from serve_app.config import AppConfig
from serve_app.model.deployment import Text2ImageModel
from serve_app.protocol import GenerationItem, ModelBatch

CONTEXT = types.SimpleNamespace(
    app_name="app", deployment="Text2ImageModel",
    replica_id=ReplicaID("r1", DeploymentID("Text2ImageModel", "app")))


def args(tmp_path, **replica):
    return AppConfig.model_validate({
        "model": {"source": "fake", "generator": "serve_app.testing:load_fake_generator",
                  "warmup_sizes": [], "memory_gib": 1.0,
                  "generator_options": {"loads_log": str(tmp_path / "loads")}},
        "models": [{"id": "b", "source": "fake", "memory_gib": 1.0},
                   {"id": "big", "source": "fake", "memory_gib": 2.0},
                   {"id": "c", "source": "fake", "memory_gib": 0.5},
                   {"id": "styled", "source": "fake",
                    "loras": [{"source": str(tmp_path / "missing.safetensors")}]}],
        "replica": replica,
        "store": {"url": str(tmp_path / "store")}}).model_dump(mode="json")


def run_replica(config, script):
    """Starts the replica, then runs one one-call batch per model id of `script`; per
    batch (error, held models, loads, evictions)."""
    async def main():
        with mock.patch.object(multiplex, "_get_internal_replica_context",
                               return_value=CONTEXT):
            cls = Text2ImageModel.func_or_class
            replica = cls.__new__(cls)
            await replica.__init__(config)
            out = [(None, replica.stats()["held"], {}, {})]
            try:
                for model, call_model in script:
                    with mock.patch("ray.serve.get_multiplexed_model_id", return_value=model):
                        results = await replica.run_batch(ModelBatch((GenerationItem(
                            "p", 64, 64, 1, seed=1, model=call_model),)))
                    stats = replica.stats()
                    out.append((results[0].error, stats["held"], stats["loads"],
                                stats["evictions"]))
            finally:
                wrapper = getattr(replica.get_model.__wrapped__, "__serve_multiplex_wrapper")
                await wrapper.metrics_pusher.graceful_shutdown()
            return out
    return asyncio.run(main())


def test_the_count_limit_evicts_the_least_recently_used(tmp_path):
    steps = run_replica(args(tmp_path, max_models_per_replica=2),
                        [("b", "b"), ("sdxl-turbo", None), ("c", "c"), ("b", "b")])
    assert steps == [
        (None, ["sdxl-turbo"], {}, {}),
        (None, ["sdxl-turbo", "b"], {"sdxl-turbo": 1, "b": 1}, {}),
        # Held: no load; it becomes the most recently used.
        (None, ["sdxl-turbo", "b"], {"sdxl-turbo": 1, "b": 1}, {}),
        (None, ["sdxl-turbo", "c"], {"sdxl-turbo": 1, "b": 1, "c": 1}, {"b": 1}),
        (None, ["c", "b"], {"sdxl-turbo": 1, "b": 2, "c": 1}, {"b": 1, "sdxl-turbo": 1}),
    ]
    assert (tmp_path / "loads").read_text().split() == ["sdxl-turbo", "b", "c", "b"]


def test_the_memory_budget_evicts_until_the_model_fits(tmp_path):
    steps = run_replica(args(tmp_path, models_memory_gib=2.5),
                        [("b", "b"), ("big", "big"), ("c", "c"), ("sdxl-turbo", None)])
    held = [(error, models) for error, models, _, _ in steps]
    assert held == [
        (None, ["sdxl-turbo"]), (None, ["sdxl-turbo", "b"]),
        (None, ["big"]),  # 2 + 2 GiB held would be over 2.5: both evicted, oldest first
        (None, ["big", "c"]),  # 2.5: fits
        (None, ["c", "sdxl-turbo"]),  # 3.5 would not: big (least recently used) goes
    ]
    assert steps[-1][3] == {"sdxl-turbo": 1, "b": 1, "big": 1}


@pytest.mark.parametrize("model, call_model, error", [
    ("b", "c", "model_mismatch"),  # a call of another model never runs on this one
    ("styled", "styled", "model_unavailable"),  # its adapter's file is missing
])
def test_a_batch_runs_only_on_its_own_loadable_model(tmp_path, model, call_model, error):
    steps = run_replica(args(tmp_path), [(model, call_model), ("sdxl-turbo", None)])
    assert [s[0] for s in steps] == [None, error, None]
