"""What a real ACK rollout needs beyond the schema: fields KubeRay 1.7 actually reads, a head
that survives a restart, disruption budgets and spreading, graceful draining, image pulls
and the weights volume. Sources: KubeRay v1.7.0 (ray-operator/), Ray 2.60.0 (the installed
package), the Alibaba Cloud CSI driver (pkg/oss)."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys

import click
import kubernetes_validate
import pytest
from ray.scripts.scripts import start as ray_start_command
from ray.serve._private.constants import (
    DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
    PROXY_MIN_DRAINING_PERIOD_S,
)

from serve_app.app import (
    consumer_deployment_options,
    ingress_deployment_options,
    model_deployment_options,
)
from serve_app.config import AppConfig
from serve_app.tee import detect_tee
from tests.kuberay.manifests import (
    BUILDS,
    KUBERAY,
    KUBERNETES_VERSION,
    OVERLAYS,
    REPO,
    app_args,
    build,
    pod_templates,
    quantity_bytes,
    quantity_cpus,
    rayservice,
    worker_group,
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
def test_disruption_budgets_keep_an_ingress_and_a_model_replica_and_let_drains_proceed(
        name: str) -> None:
    """Issue 20: a budget holding the only head (minAvailable 1 of 1) stalled every drain
    of its node; with GCS fault tolerance the head has none. The model budget holds one of
    at least two model pods (min_replicas >= 2), so a drain can always take one."""
    budgets = _budgets(name)
    assert sorted(budgets) == ["sdxl-turbo-ingress", "sdxl-turbo-model"]
    service = rayservice(name)
    assert service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]
    templates = pod_templates(service)
    config = AppConfig.model_validate(app_args(service))
    assert config.replica.autoscaling is not None
    assert config.replica.autoscaling.min_replicas >= budgets["sdxl-turbo-model"][
        "minAvailable"] + 1
    assert worker_group(service, "model")["minReplicas"] == (
        config.replica.autoscaling.min_replicas)
    for group in ("ingress", "model"):
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


# --- shutdown drains ---------------------------------------------------------------------

DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"   # Ray 2.60: ray_constants, node.py
OVERWRITE_COMMAND = "ray.io/overwrite-container-cmd"


def _group_spec(service: dict, group: str) -> dict:
    cluster = service["spec"]["rayClusterConfig"]
    if group == "head":
        return cluster["headGroupSpec"]
    (spec,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == group]
    return spec


def kuberay_ray_start_line(service: dict, group: str) -> str:
    """The `ray start` line KubeRay 1.7 generates for a group and stores in
    $KUBERAY_GEN_RAY_START_CMD (common/pod.go: setMissingRayStartParams,
    generateRayStartCommand, convertParamMap; configureRedisFT for the password)."""
    cluster = service["spec"]["rayClusterConfig"]
    spec = _group_spec(service, group)
    params = dict(spec["rayStartParams"])
    if group == "head":
        params.setdefault("dashboard-host", "0.0.0.0")
        if "redisPassword" in cluster.get("gcsFaultToleranceOptions", {}):
            params["redis-password"] = "$REDIS_PASSWORD"
    else:
        params.setdefault("address", "sdxl-turbo-abcde-head-svc.default.svc.cluster.local:6379")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits = spec["template"]["spec"]["containers"][0]["resources"]["limits"]
    params.setdefault("num-cpus", str(int(quantity_cpus(limits["cpu"]))))
    params.setdefault("memory", str(quantity_bytes(limits["memory"])))
    flags = "".join(f" --{k} " if v.lower() == "true" else f" --{k}={v} "
                    for k, v in sorted(params.items()))
    return ("ray start --head" if group == "head" else "ray start") + flags


FAKE_RAY = """import json, os, sys
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:]}))
"""


def run_container_command(container: dict, start_line: str, tmp_path) -> tuple[int, dict]:
    """Runs the container's command with bash, a stand-in `ray` on PATH and the environment
    KubeRay gives the container; returns (pid of the process started, what `ray` saw)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "ray"
    fake.write_text(f"#!{sys.executable}\n{FAKE_RAY}")
    fake.chmod(0o755)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}",
           "KUBERAY_GEN_RAY_START_CMD": start_line,
           "RAY_START_ULIMIT_OPEN_FILES": str(soft),   # raising it may need privileges here
           "REDIS_PASSWORD": "pa55-w0rd!"}
    process = subprocess.Popen(container["command"] + container["args"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return process.pid, json.loads(out)


@pytest.mark.parametrize("group", ("head", "ingress", "model"))
def test_ray_start_is_pid_1_so_a_pod_deletion_drains_the_node(group: str, tmp_path) -> None:
    service = rayservice("overlays/g8i")
    template = _group_spec(service, group)["template"]
    container = template["spec"]["containers"][0]
    # `ray stop` in preStop killed the raylet and the replicas before any SIGTERM.
    assert "lifecycle" not in container
    assert template["metadata"]["annotations"] == {OVERWRITE_COMMAND: "true"}
    assert container["command"] == ["/bin/bash", "-c", "--"]
    pid, seen = run_container_command(
        container, kuberay_ray_start_line(service, group), tmp_path)
    # exec: `ray start` replaced the shell, i.e. it is what the kubelet's SIGTERM reaches.
    assert seen["pid"] == pid
    assert seen["argv"][0] == "start"
    # Ray's own CLI accepts the line the shell made of it, quoting and variables resolved.
    params = ray_start_command.make_context("start", seen["argv"][1:]).params
    assert params["block"] is True
    assert params["head"] is (group == "head")
    if group == "head":
        assert params["redis_password"] == "pa55-w0rd!"
    if group == "ingress":
        assert json.loads(params["resources"]) == {"ingress": 1000}
    else:
        assert params["resources"] == "{}"


def test_the_command_check_catches_a_command_without_eval(tmp_path) -> None:
    """KubeRay's sample runs `$KUBERAY_GEN_RAY_START_CMD` unevaluated: its quotes stay literal
    and the ingress pod's resources JSON is split apart."""
    service = rayservice("overlays/g8i")
    container = dict(pod_templates(service)["ingress"]["spec"]["containers"][0])
    container["args"] = ["ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; "
                         "exec $KUBERAY_GEN_RAY_START_CMD"]
    pid, seen = run_container_command(
        container, kuberay_ray_start_line(service, "ingress"), tmp_path)
    assert seen["pid"] == pid
    assert "--resources='{\"ingress\":" in seen["argv"]
    with pytest.raises(click.UsageError, match="unexpected extra argument"):
        ray_start_command.make_context("start", seen["argv"][1:])


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_drain_window_covers_graceful_replica_shutdown(name: str) -> None:
    service = rayservice(name)
    config = AppConfig.model_validate(app_args(service))
    graceful = {
        "model": model_deployment_options(config).get(
            "graceful_shutdown_timeout_s", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S),
        "ingress": ingress_deployment_options(config).get(
            "graceful_shutdown_timeout_s", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S),
    }
    assert graceful["model"] == 120
    assert sorted(pod_templates(service)) == ["head", "ingress", "model"]
    # The JobConsumer replicas run on the ingress pods (ingress.resources). Issue 20: their
    # graceful shutdown (a running job's bound, 330 s) was longer than the pods' 140 s
    # drain, so every drain cut the running jobs (redelivered 900 s later).
    consumer = consumer_deployment_options(config)["graceful_shutdown_timeout_s"]
    assert consumer == config.ingress.request_timeout_s + 30 == 330
    on_pod = {"head": [], "ingress": [graceful["ingress"], consumer],
              "model": [graceful["model"]]}
    expected = {"head": (350, 360), "ingress": (350, 360), "model": (140, 150)}
    drains = {}
    for group, template in pod_templates(service).items():
        spec = template["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        drain = float(env[DRAIN_ENV])
        drains[group] = drain
        assert (drain, spec["terminationGracePeriodSeconds"]) == expected[group]
        # SIGKILL comes after the drain, with time left to stop the processes.
        assert drain + 10 <= spec["terminationGracePeriodSeconds"]
        # Serve stops a replica on a draining node at the latest graceful_shutdown_timeout_s
        # before the drain deadline; the proxy drains for at least 30 s.
        assert drain >= max(on_pod[group] + [graceful["model"]]) + 20
        assert drain > PROXY_MIN_DRAINING_PERIOD_S
    # The head (GCS, Serve controller) drains as long as any worker: when a whole cluster
    # is deleted it outlives them.
    assert drains["head"] >= max(drains.values())


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_old_cluster_outlives_the_longest_request_after_an_upgrade(name: str) -> None:
    service = rayservice(name)
    config = AppConfig.model_validate(app_args(service))
    delay = service["spec"]["rayClusterDeletionDelaySeconds"]
    assert delay == 360
    assert config.ingress.request_timeout_s == 300
    assert delay >= config.ingress.request_timeout_s + 60


# --- image pulls --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_every_pod_can_pull_from_a_private_registry(name: str) -> None:
    for template in pod_templates(rayservice(name)).values():
        assert template["spec"]["imagePullSecrets"] == [{"name": "sdxl-turbo-registry"}]


# --- the weights volume -------------------------------------------------------------------

def _mount_options(other_opts: str) -> list[str]:
    """The CSI driver's reading of otherOpts ("-o a -o b,c" -> [a, b, c], pkg/oss/utils.go)."""
    words = other_opts.replace("-o", " -o ").split()
    assert words[::2] == ["-o"] * (len(words) // 2) and len(words) % 2 == 0, other_opts
    return [o for value in words[1::2] for o in value.split(",")]


def test_weights_volume_needs_no_secret_in_a_fixed_namespace() -> None:
    (pv,) = [o for o in build("overlays/g8i-lite") if o["kind"] == "PersistentVolume"]
    csi = pv["spec"]["csi"]
    # A PV is cluster-scoped: a nodePublishSecretRef must name the Secret's namespace, which
    # is wherever the RayService happens to be deployed. RRSA needs no Secret at all.
    assert set(csi) == {"driver", "volumeHandle", "readOnly", "volumeAttributes"}
    attributes = csi["volumeAttributes"]
    assert {k: attributes[k] for k in ("fuseType", "authType", "roleName")} == {
        "fuseType": "ossfs2", "authType": "rrsa", "roleName": "sdxl-turbo-oss-weights-reader"}
    assert not {"akId", "akSecret"} & set(attributes)


def test_weights_volume_sets_no_option_the_driver_sets() -> None:
    (pv,) = [o for o in build("overlays/g8i-lite") if o["kind"] == "PersistentVolume"]
    csi = pv["spec"]["csi"]
    options = _mount_options(csi["volumeAttributes"]["otherOpts"])
    # Read-only: the driver derives it from readOnly / ReadOnlyMany (ossfs 2.0: ro=true).
    assert csi["readOnly"] is True and pv["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert options == ["allow_other", "umask=022"]
    assert not {"ro", "ro=true", "rw"} & set(options)


def test_mount_option_parser() -> None:
    assert _mount_options("-o ro -oallow_other -o gid=1000,uid=1000") == [
        "ro", "allow_other", "gid=1000", "uid=1000"]


# --- TDX: checking a node before the rollout -----------------------------------------------

TDX_CHECK = KUBERAY / "tdx-check"


def _tdx_check_pod() -> dict:
    """The pod as `kubectl apply -k kuberay/tdx-check` creates it (image and node-pool pin
    from kuberay/params, as for the TDX overlay)."""
    (pod,) = build("tdx-check")
    assert pod["kind"] == "Pod"
    return pod


def test_tdx_check_pod_is_placed_and_confined_like_the_tdx_ray_pods() -> None:
    pod = _tdx_check_pod()
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    templates = pod_templates(rayservice("overlays/tdx"))
    model = templates["model"]["spec"]
    spec = pod["spec"]
    # What makes /dev/tdx_guest invisible and the CPU flag decisive is the same here as in
    # the Ray pods: unprivileged, uid 1000, no capabilities, on the TDX pool.
    for key in ("nodeSelector", "tolerations", "securityContext", "imagePullSecrets"):
        assert spec[key] == model[key], key
    (container,) = spec["containers"]
    assert container["securityContext"] == model["containers"][0]["securityContext"]
    assert "volumes" not in spec and "volumeMounts" not in container
    # The lite image the ingress pods run: serve_app without the weights.
    assert container["image"] == templates["ingress"]["spec"]["containers"][0]["image"]
    assert spec["restartPolicy"] == "Never"
    # The probe security.require_tee runs by default is the function the check calls.
    assert AppConfig.model_validate({}).security.tee_probe == "serve_app.tee:detect_tee"
    assert container["command"][:2] == ["python", "-c"]
    assert "detect_tee()" in container["command"][2]


def test_tdx_check_exits_0_exactly_where_require_tee_would_start() -> None:
    script = _tdx_check_pod()["spec"]["containers"][0]["command"][2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env={**os.environ, "NODE_NAME": "here"})
    tee = detect_tee()
    assert result.returncode == (0 if tee == "tdx" else 1), result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("node: here kernel: ")
    assert lines[-1] == f"detect_tee: {tee}"
