"""The model pod's memory holds the models the config serves (issue 23): kuberay/generate.py's
memory_plan (models held at once + activations + runtime) against the rendered overlays'
model pod and replica.memory_gib, the check that fails when a model is added without a
bigger pod, and the README's table of models per replica."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.kuberay.manifests import (
    KUBERAY,
    OVERLAYS,
    app_args,
    generate_module,
    rayservice,
    worker_group,
)

GENERATE = generate_module()
# kuberay/README.md, "Models per replica": models held (bf16, ~7 GiB each) -> replica.memory_gib,
# pod memory request and limit.
README_ROWS = [(1, 20, "24Gi", "32Gi"), (2, 26, "30Gi", "38Gi"), (3, 33, "37Gi", "45Gi"),
               (4, 40, "44Gi", "52Gi")]


def model_resources(service: dict) -> dict:
    return worker_group(service, "model")["template"]["spec"]["containers"][0]["resources"]


def with_models(args: dict, count: int, **replica) -> dict:
    changed = copy.deepcopy(args)
    changed["models"] = [{"id": f"sdxl-{i}", "source": f"/models/sdxl-{i}"}
                         for i in range(1, count)]
    changed["replica"].update(replica)
    return changed


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_the_rendered_model_pod_holds_the_configured_models(name: str) -> None:
    service = rayservice(name)
    args = app_args(service)
    # configs/production.yaml: one SDXL-class model in bfloat16 (~7 GiB).
    assert GENERATE.memory_plan(args) == {"models_gib": 7.0, "replica_gib": 18.5,
                                          "pod_limit_gib": 20.5}
    assert GENERATE.sizing_problems(args, model_resources(service)) == []
    assert args["replica"]["memory_gib"] >= GENERATE.memory_plan(args)["replica_gib"]


def test_a_second_model_without_a_bigger_pod_is_caught() -> None:
    service = rayservice("overlays/g8i")
    args = with_models(app_args(service), 2)
    assert GENERATE.memory_plan(args)["models_gib"] == 14.0
    assert GENERATE.sizing_problems(args, model_resources(service)) == [
        "replica.memory_gib 20 < 25.5 GiB needed: 14 GiB of models held + 10 activations + "
        "1.5 runtime (kuberay/README.md, \"Models per replica\")"]


def test_the_generate_check_fails_on_an_undersized_pod(tmp_path, monkeypatch, capsys) -> None:
    production = yaml.safe_load(GENERATE.SOURCE.read_text())
    production["applications"][0]["args"] = with_models(production["applications"][0]["args"], 3)
    source = tmp_path / "production.yaml"
    source.write_text(yaml.safe_dump(production))
    monkeypatch.setattr(GENERATE, "SOURCE", source)
    assert GENERATE.main(["--check"]) == 1
    assert "model pod too small: replica.memory_gib 20 < 32.5 GiB needed" in capsys.readouterr().out


def test_held_models_follow_max_models_per_replica_and_the_budget() -> None:
    args = app_args(rayservice("overlays/g8i"))
    assert GENERATE.memory_plan(with_models(args, 3))["models_gib"] == 21.0
    assert GENERATE.memory_plan(with_models(args, 3, max_models_per_replica=1))[
        "models_gib"] == 7.0
    assert GENERATE.memory_plan(with_models(args, 3, models_memory_gib=15))["models_gib"] == 15
    # A model's own memory_gib (here an int8 OpenVINO one) counts instead of the estimate.
    small = with_models(args, 1)
    small["models"] = [{"id": "int8", "source": "/models/int8", "memory_gib": 4}]
    assert GENERATE.memory_plan(small)["models_gib"] == 11.0


@pytest.mark.parametrize("models,memory_gib,pod_request,pod_limit", README_ROWS)
def test_the_readme_table_of_models_per_replica_fits(models, memory_gib, pod_request,
                                                     pod_limit) -> None:
    service = rayservice("overlays/g8i")
    args = with_models(app_args(service), models, memory_gib=memory_gib,
                       max_models_per_replica=models)
    resources = {"requests": {"memory": pod_request}, "limits": {"memory": pod_limit}}
    assert GENERATE.sizing_problems(args, resources) == []
    # Tight: at most the reference pod's 1.5 GiB of margin over the need.
    assert 0 <= memory_gib - GENERATE.memory_plan(args)["replica_gib"] <= 1.5
    row = f"| {models} | {7 * models} GiB | {memory_gib} | {pod_request} | {pod_limit} |"
    assert row in (KUBERAY / "README.md").read_text()
