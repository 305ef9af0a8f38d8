"""kuberay/upgrade.py: an upgrade's new cluster starts with the live number of model replicas
(issue 20: KubeRay switched traffic to a new cluster of min_replicas)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import yaml

from serve_app.app import model_deployment_options
from serve_app.config import AppConfig
from tests.kuberay.manifests import KUBERAY, app_args, build, rayservice, worker_group


def upgrade_module():
    spec = importlib.util.spec_from_file_location("kuberay_upgrade", KUBERAY / "upgrade.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pod(ready: bool, terminating: bool = False) -> dict:
    meta = {"deletionTimestamp": "2026-01-01T00:00:00Z"} if terminating else {}
    return {"metadata": meta, "status": {"conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeKubectl:
    """kubectl as upgrade.py calls it: the overlay rendered by tests/kuberay, a live
    cluster with `pods`, and the manifests it is asked to apply."""

    def __init__(self, overlay: str, pods: list[dict], active: str = "sdxl-turbo-abcde"):
        self.overlay, self.pods, self.active = overlay, pods, active
        self.calls: list[tuple[str, ...]] = []
        self.applied: list[dict] | None = None

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        self.calls.append(args)
        if args[0] == "kustomize":
            assert args[1] == f"kuberay/{self.overlay}"
            return yaml.safe_dump_all(build(self.overlay))
        if args[:2] == ("get", "rayservice"):
            assert args[2] == "sdxl-turbo"
            return self.active
        if args[:2] == ("get", "pods"):
            assert args[-1] == f"ray.io/cluster={self.active},ray.io/group=model"
            return json.dumps({"items": self.pods})
        if args[:3] == ("apply", "-f", "-"):
            self.applied = [d for d in yaml.safe_load_all(stdin) if d]
            return "rayservice.ray.io/sdxl-turbo configured\n"
        raise AssertionError(args)


def test_without_it_a_new_cluster_starts_with_min_replicas() -> None:
    """What KubeRay's NewCluster upgrade would switch traffic to with a plain apply."""
    config = AppConfig.model_validate(app_args(rayservice("overlays/g8i")))
    options = model_deployment_options(config)["autoscaling_config"]
    assert options["initial_replicas"] == config.replica.autoscaling.min_replicas == 2


@pytest.mark.parametrize("overlay", ("overlays/g8i", "overlays/tdx", "overlays/g8i-lite"))
def test_the_new_cluster_starts_with_the_live_ready_model_replicas(overlay, capsys) -> None:
    live = [pod(True)] * 5 + [pod(False), pod(True, terminating=True)]
    kubectl = FakeKubectl(overlay, live)
    assert upgrade_module().main([f"kuberay/{overlay}"], kubectl=kubectl) == 0
    assert "model replicas live: 5; the new cluster starts with 5" in capsys.readouterr().err
    before = build(overlay)
    after = kubectl.applied
    assert [o["kind"] for o in after] == [o["kind"] for o in before]
    (service,) = [o for o in after if o["kind"] == "RayService"]
    config = AppConfig.model_validate(app_args(service))
    assert config.replica.autoscaling.initial_replicas == 5
    assert model_deployment_options(config)["autoscaling_config"]["initial_replicas"] == 5
    assert worker_group(service, "model")["replicas"] == 5
    # Nothing else changed: the same objects with those two values put back.
    restored = copy.deepcopy(service)
    worker_group(restored, "model")["replicas"] = worker_group(
        rayservice(overlay), "model")["replicas"]
    args = yaml.safe_load(restored["spec"]["serveConfigV2"])
    del args["applications"][0]["args"]["replica"]["autoscaling"]["initial_replicas"]
    assert args == yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    restored["spec"]["serveConfigV2"] = rayservice(overlay)["spec"]["serveConfigV2"]
    assert restored == rayservice(overlay)
    assert [o for o in after if o["kind"] != "RayService"] == [
        o for o in before if o["kind"] != "RayService"]


@pytest.mark.parametrize("live,expected", [(0, 2), (1, 2), (3, 3), (8, 8), (20, 8)])
def test_the_start_is_clamped_to_the_autoscaling_bounds(live, expected) -> None:
    objects = build("overlays/g8i")
    assert upgrade_module().size_new_cluster(objects, live) == expected
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    assert AppConfig.model_validate(app_args(service)).replica.autoscaling.initial_replicas == (
        expected)


def test_first_deploy_and_dry_run(capsys) -> None:
    kubectl = FakeKubectl("overlays/g8i", [], active="")
    assert upgrade_module().main(["kuberay/overlays/g8i", "--dry-run"], kubectl=kubectl) == 0
    out = capsys.readouterr()
    assert "model replicas live: 0; the new cluster starts with 2" in out.err
    assert kubectl.applied is None
    assert [c[:2] for c in kubectl.calls] == [("kustomize", "kuberay/overlays/g8i"),
                                              ("get", "rayservice")]
    printed = [d for d in yaml.safe_load_all(out.out) if d]
    (service,) = [o for o in printed if o["kind"] == "RayService"]
    assert worker_group(service, "model")["replicas"] == 2


def test_initial_replicas_outside_the_bounds_is_refused() -> None:
    with pytest.raises(ValueError, match="initial_replicas must be within"):
        AppConfig.model_validate({"replica": {"autoscaling": {
            "min_replicas": 2, "max_replicas": 8, "initial_replicas": 9}}})
