"""What a real ACK rollout needs beyond the schema: fields KubeRay 1.7 actually reads, a head
that survives a restart, disruption budgets and spreading, graceful draining, image pulls
and the weights volume. Sources: KubeRay v1.7.0 (ray-operator/), Ray 2.60.0 (the installed
package), the Alibaba Cloud CSI driver (pkg/oss)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from tests.kuberay.manifests import (
    BUILDS,
    KUBERNETES_VERSION,
    OVERLAYS,
    build,
    pod_templates,
    rayservice,
)

# rayservice_types.go at v1.7.0: "Deprecated: This field is not used anymore" (kuberay#1685).
KUBERAY_1_7_UNUSED = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
INITIALIZING_TIMEOUT = "ray.io/initializing-timeout"


def go_duration_seconds(text: str) -> float:
    """What KubeRay's getInitializingTimeout accepts: a Go duration (h, m, s parts) or an
    integer number of seconds."""
    if re.fullmatch(r"[0-9]+", text):
        return float(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# --- fields KubeRay 1.7 reads -----------------------------------------------------------

@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_no_field_kuberay_1_7_ignores(name: str) -> None:
    assert KUBERAY_1_7_UNUSED.isdisjoint(rayservice(name)["spec"])


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_first_start_is_bounded_by_the_initializing_timeout(name: str) -> None:
    annotations = rayservice(name)["metadata"]["annotations"]
    assert annotations == {INITIALIZING_TIMEOUT: "30m"}
    assert go_duration_seconds(annotations[INITIALIZING_TIMEOUT]) == 1800


def test_go_duration_parser() -> None:
    assert go_duration_seconds("900") == 900
    assert go_duration_seconds("1h30m") == 5400
    with pytest.raises(AssertionError):
        go_duration_seconds("30 minutes")


# --- the head is not a single point of failure ---------------------------------------------

@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_gcs_fault_tolerance_with_an_external_redis(name: str) -> None:
    cluster = rayservice(name)["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"] == {
        "redisAddress": "r-xxxxxxxxxxxxxxxxxx.redis.rds.aliyuncs.com:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {
            "name": "sdxl-turbo-redis", "key": "password"}}},
    }
    # What KubeRay 1.7's ValidateRayClusterSpec rejects next to gcsFaultToleranceOptions
    # (utils/validation.go), and the legacy annotation it refuses to combine with them.
    head = cluster["headGroupSpec"]
    env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    assert env.isdisjoint({"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"})
    assert {"redis-password", "redis-username"}.isdisjoint(head["rayStartParams"])
    assert "ray.io/ft-enabled" not in rayservice(name)["metadata"].get("annotations", {})
    assert "ray.io/external-storage-namespace" not in rayservice(name)["metadata"].get(
        "annotations", {})


@pytest.mark.parametrize("name", BUILDS)
def test_plain_objects_validate_strictly(name: str) -> None:
    for obj in build(name):
        if obj["kind"] != "RayService":
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _budgets(name: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"] for o in build(name)
            if o["kind"] == "PodDisruptionBudget"}


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_disruption_budgets_keep_the_head_an_ingress_and_a_model_replica(name: str) -> None:
    budgets = _budgets(name)
    assert sorted(budgets) == ["sdxl-turbo-head", "sdxl-turbo-ingress", "sdxl-turbo-model"]
    templates = pod_templates(rayservice(name))
    for group in ("head", "ingress", "model"):
        spec = budgets[f"sdxl-turbo-{group}"]
        # Integer minAvailable: RayCluster has no scale subresource, so maxUnavailable or a
        # percentage would leave the budget unable to allow any eviction.
        assert spec["minAvailable"] == 1 and "maxUnavailable" not in spec
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        selector = dict(spec["selector"]["matchLabels"])
        assert set(spec["selector"]) == {"matchLabels"}
        # The head's budget also names KubeRay's node type, which its Redis cleanup Job's pod
        # (built from the same template) does not share.
        if group == "head":
            assert selector.pop("ray.io/node-type") == "head"
        assert selector == {"app.kubernetes.io/name": "sdxl-turbo", "sdxl-turbo/role": group}
        labels = templates[group]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        others = [g for g in templates if g != group]
        assert not any(selector.items() <= templates[g]["metadata"]["labels"].items()
                       for g in others)
    # Ingress pods are at least two, so one of them may go at a time.
    assert rayservice(name)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0][
        "minReplicas"] == 2


def _spread(group: str, key: str, when: str) -> dict:
    return {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": when,
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "sdxl-turbo",
                                              "sdxl-turbo/role": group}},
            "matchLabelKeys": ["ray.io/cluster"]}


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_ingress_and_model_pods_spread_over_nodes_and_zones(name: str) -> None:
    templates = pod_templates(rayservice(name))
    spread = {g: t["spec"].get("topologySpreadConstraints") for g, t in templates.items()}
    assert spread == {
        "head": None,
        # Hard for the ingress pods: two on one node would both go with it.
        "ingress": [_spread("ingress", "kubernetes.io/hostname", "DoNotSchedule"),
                    _spread("ingress", "topology.kubernetes.io/zone", "ScheduleAnyway")],
        "model": [_spread("model", "kubernetes.io/hostname", "ScheduleAnyway"),
                  _spread("model", "topology.kubernetes.io/zone", "ScheduleAnyway")],
    }
    for group in ("ingress", "model"):
        labels = templates[group]["metadata"]["labels"]
        for constraint in spread[group]:
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
