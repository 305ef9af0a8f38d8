"""Issue 20, a first rollout on ACK: one knob per image, one place for an environment's
values, a namePrefix overlay whose references all follow, the export Job, the object-store
settings in the pods, exposure, network policy, disk, placement and the FUSE health check."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.config import AppConfig
from tests.kuberay import kustomize_lite
from tests.kuberay.manifests import (
    BUILDS,
    KUBECTL,
    KUBERAY,
    OVERLAYS,
    PRODUCTION,
    app_args,
    build,
    kubectl_build,
    pod_templates,
    rayservice,
    worker_group,
)

PARAMS = KUBERAY / "params" / "params.yaml"
IMAGE = re.compile(r"^registry\.example\.com/sdxl-turbo/sdxl-turbo-serve:"
                   r"(?P<version>[0-9][A-Za-z0-9_.\-]*)-(?P<kind>lite|full)$")
RENDERERS = ["python"] + (["kubectl"] if KUBECTL else [])


def render(directory: Path, renderer: str) -> list[dict[str, Any]]:
    return kubectl_build(directory) if renderer == "kubectl" else kustomize_lite.render(directory)


def params() -> dict[str, str]:
    return yaml.safe_load(PARAMS.read_text())["values"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayService":
        return [c for t in pod_templates(obj).values() for c in t["spec"]["containers"]]
    if obj["kind"] == "Job":
        return obj["spec"]["template"]["spec"]["containers"]
    if obj["kind"] == "Pod":
        return obj["spec"]["containers"]
    return []


def _walk_strings(node: Any, skip: tuple[str, ...] = ()):
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in skip:
                yield from _walk_strings(value, skip)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_strings(value, skip)
    elif isinstance(node, str):
        yield node


# --- 3. one knob per image, no version skew -------------------------------------------------

def test_every_pod_and_job_of_every_build_runs_one_version() -> None:
    versions = set()
    kinds = {}
    for name in BUILDS:
        for obj in build(name):
            for container in containers(obj):
                match = IMAGE.match(container["image"])
                assert match is not None, (name, container["image"])
                versions.add(match["version"])
                kinds[(name, obj["kind"], container["name"])] = match["kind"]
    assert versions == {"0.1.0-ray2.60.0"}
    # Only the model pods of the weights-in-image overlays pull the full image.
    full = sorted(key for key, kind in kinds.items() if kind == "full")
    assert full == [("base", "RayService", "ray-worker"),
                    ("overlays/g8i", "RayService", "ray-worker"),
                    ("overlays/tdx", "RayService", "ray-worker")]
    for overlay in ("overlays/g8i", "overlays/tdx"):
        templates = pod_templates(rayservice(overlay))
        assert templates["model"]["spec"]["containers"][0]["image"].endswith("-full")
        assert templates["head"]["spec"]["containers"][0]["image"].endswith("-lite")


def test_image_names_and_tags_are_written_once() -> None:
    """The two images are set in kuberay/params (kustomize `images:`) and nowhere else: no
    other file names the registry or a tag."""
    where = sorted(str(p.relative_to(KUBERAY)) for p in KUBERAY.rglob("*.yaml")
                   if "registry.example.com" in p.read_text() or "0.1.0-ray" in p.read_text())
    assert where == ["params/kustomization.yaml"]
    images = yaml.safe_load((KUBERAY / "params" / "kustomization.yaml").read_text())["images"]
    assert [i["name"] for i in images] == ["sdxl-turbo-serve-lite", "sdxl-turbo-serve-full"]
    assert {i["newTag"].rsplit("-", 1)[0] for i in images} == {"0.1.0-ray2.60.0"}


# --- 7. one place for an environment's values ----------------------------------------------

CHANGED = {
    "redisAddress": "r-staging0000000000.redis.rds.aliyuncs.com:6379",
    "modelsBucket": "staging-models",
    "ossEndpoint": "oss-cn-shanghai-internal.aliyuncs.com",
    "g8iNodePool": "g8i-staging",
    "tdxNodePool": "tdx-staging",
    "modelInstanceType": "ecs.g8i.8xlarge",
}


@pytest.mark.parametrize("renderer", RENDERERS)
def test_changing_params_changes_every_build_and_leaves_no_old_value(renderer, tmp_path) -> None:
    copy = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, copy)
    doc = yaml.safe_load(PARAMS.read_text())
    old = dict(doc["values"])
    assert set(old) == set(CHANGED)
    doc["values"] = CHANGED
    (copy / "params" / "params.yaml").write_text(yaml.safe_dump(doc))
    kustomization = yaml.safe_load((copy / "params" / "kustomization.yaml").read_text())
    for image in kustomization["images"]:
        image["newTag"] = image["newTag"].replace("0.1.0", "0.2.0")
    (copy / "params" / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name in BUILDS:
        objects = render(copy / name, renderer)
        # serveConfigV2 is generated from configs/production.yaml (the image store's own
        # endpoint is there): not a place these values live.
        text = "\n".join(_walk_strings(objects, skip=("serveConfigV2",)))
        for key, value in old.items():
            assert value not in text, (name, key)
        for obj in objects:
            for container in containers(obj):
                assert "0.2.0-ray2.60.0-" in container["image"], name
        services = [o for o in objects if o["kind"] == "RayService"]
        for service in services:
            cluster = service["spec"]["rayClusterConfig"]
            assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == CHANGED["redisAddress"]
            pool = CHANGED["tdxNodePool" if name == "overlays/tdx" else "g8iNodePool"]
            if name != "base":
                for template in pod_templates(service).values():
                    assert template["spec"]["nodeSelector"] == {"nodepool-label": pool}
            terms = worker_group(service, "model")["template"]["spec"]["affinity"][
                "nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"]
            assert terms == [{"matchExpressions": [{
                "key": "node.kubernetes.io/instance-type", "operator": "In",
                "values": [CHANGED["modelInstanceType"]]}]}]
        for pv in (o for o in objects if o["kind"] == "PersistentVolume"):
            attributes = pv["spec"]["csi"]["volumeAttributes"]
            assert (attributes["bucket"], attributes["url"]) == (
                CHANGED["modelsBucket"], CHANGED["ossEndpoint"])
        for obj in objects:
            if obj["kind"] in ("Job", "Pod"):
                spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Job" else obj["spec"]
                pool = CHANGED["g8iNodePool" if obj["kind"] == "Job" else "tdxNodePool"]
                assert spec["nodeSelector"] == {"nodepool-label": pool}


def test_the_image_store_is_in_the_region_of_the_params() -> None:
    """The image bucket is the app's own setting (configs/production.yaml, generated into
    serveConfigV2); its endpoint must be the region of params' OSS endpoint."""
    store = AppConfig.model_validate(
        yaml.safe_load(PRODUCTION.read_text())["applications"][0]["args"]).store
    endpoint = store.storage_options["endpoint_url"]
    assert endpoint == f"https://{params()['ossEndpoint']}"


@pytest.mark.parametrize("renderer", RENDERERS)
def test_a_name_prefix_overlay_renames_every_reference(renderer, tmp_path) -> None:
    """Issue 20: with `namePrefix: staging-` the PVC was renamed but the RayService still
    claimed sdxl-turbo-weights; the cluster-scoped PV and its volumeHandle collided with
    another environment's."""
    environments = {}
    for prefix in ("staging-", "prod-"):
        for base in ("overlays/g8i-lite", "openvino-export"):
            overlay = tmp_path / prefix / base.replace("/", "-")
            overlay.mkdir(parents=True)
            (overlay / "kustomization.yaml").write_text(
                f"resources:\n  - {os.path.relpath(KUBERAY / base, overlay)}\n"
                f"namePrefix: {prefix}\n")
            environments[(prefix, base)] = render(overlay, renderer)
    for (prefix, base), objects in environments.items():
        names = {(o["kind"], o["metadata"]["name"]) for o in objects}
        assert all(name.startswith(prefix) for _, name in names), names
        claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
        volumes = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolume"}
        (claim,) = claims
        for pv in (o for o in objects if o["kind"] == "PersistentVolume"):
            assert pv["spec"]["csi"]["volumeHandle"] == pv["metadata"]["name"]
        for pvc in (o for o in objects if o["kind"] == "PersistentVolumeClaim"):
            assert pvc["spec"]["volumeName"] in volumes
        referenced = set()
        for obj in objects:
            if obj["kind"] == "RayService":
                templates = pod_templates(obj).values()
            elif obj["kind"] == "Job":
                templates = [obj["spec"]["template"]]
            else:
                continue
            for template in templates:
                for volume in template["spec"].get("volumes", []):
                    referenced.add(volume["persistentVolumeClaim"]["claimName"])
        assert referenced == {claim}
        # Nothing points at an unprefixed name of an object of the build.
        text = "\n".join(_walk_strings(objects, skip=("serveConfigV2", "labels",
                                                      "matchLabels")))
        for unprefixed in ("sdxl-turbo-weights", "sdxl-turbo-weights-writer"):
            assert not re.search(rf"(?<![a-z-]){unprefixed}(?![a-z-])", text), (prefix, base)
    # Two environments' cluster-scoped volumes never share a name or a handle.
    for base in ("overlays/g8i-lite", "openvino-export"):
        handles = [{pv["spec"]["csi"]["volumeHandle"] for pv in environments[(p, base)]
                    if pv["kind"] == "PersistentVolume"} for p in ("staging-", "prod-")]
        assert handles[0] and not handles[0] & handles[1]


# --- 2. the OpenVINO export Job -------------------------------------------------------------

def _export_job() -> dict[str, Any]:
    (job,) = [o for o in build("openvino-export") if o["kind"] == "Job"]
    return job


def test_export_job_can_write_pull_and_run_again_after_an_upgrade() -> None:
    job = _export_job()
    pod = job["spec"]["template"]["spec"]
    (writer,) = [o for o in build("openvino-export") if o["kind"] == "PersistentVolume"]
    options = writer["spec"]["csi"]["volumeAttributes"]["otherOpts"].split()
    # ossfs maps every file to these ids: the Job's user may create openvino/ there.
    context = pod["securityContext"]
    assert f"uid={context['runAsUser']}" in options
    assert f"gid={context['runAsGroup']}" in options
    assert pod["imagePullSecrets"] == [{"name": "sdxl-turbo-registry"}]
    # The name carries the image tag: a new version is a new Job for `kubectl apply`.
    (container,) = pod["containers"]
    tag = container["image"].rsplit(":", 1)[1]
    assert job["metadata"]["name"] == f"sdxl-turbo-openvino-export-{tag}"
    assert len(job["metadata"]["name"]) <= 63   # it becomes the pods' job-name label
    text = " ".join((KUBERAY / "README.md").read_text().split())
    assert "kubectl apply -k kuberay/openvino-export" in text
    assert "kubectl delete job sdxl-turbo-openvino-export-" in text


# --- 1. the object store's settings in the pods ----------------------------------------------

@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_every_ray_container_calculates_checksums_only_when_required(name: str) -> None:
    service = rayservice(name)
    store = AppConfig.model_validate(app_args(service)).store
    kwargs = store.storage_options["config_kwargs"]
    assert kwargs["request_checksum_calculation"] == "when_required"
    assert kwargs["response_checksum_validation"] == "when_required"
    assert kwargs["s3"] == {"addressing_style": "virtual"}
    for container in containers(service):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
        assert env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_no_ray_container_reports_usage_statistics(name: str) -> None:
    """Ray sends usage statistics to a public endpoint unless told not to: nothing leaves
    the cluster (in confidential mode not even metadata)."""
    service = rayservice(name)
    for container in containers(service):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"] == "0", container["name"]

# --- 8. exposure, network policy, disk, placement, FUSE health ------------------------------

def test_public_exposure_is_the_rayservice_serve_service() -> None:
    spec = rayservice("overlays/g8i")["spec"]
    service = spec["serveService"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [
        {"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    # KubeRay sets the selector (the active cluster's pods) and the name.
    assert "selector" not in service["spec"] and "name" not in service.get("metadata", {})
    assert service["metadata"]["annotations"] == {
        "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-address-type": "intranet"}
    text = " ".join((KUBERAY / "README.md").read_text().split())
    assert "a `LoadBalancer` Service or an Ingress (ACK ALB/Nginx) in front of" not in text
    assert "`spec.serveService`" in text


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_gcs_and_dashboard_answer_only_the_clusters_own_pods(name: str) -> None:
    """A policy that selects the head refuses whatever its rules do not allow: GCS (6379),
    the dashboard (8265), the client port and Ray's own ports only from this app's pods
    (every port: Ray's workers reach the head on ports Ray picks at start); the KubeRay
    operator only the dashboard and its agent; anyone else only 8000 and 8080."""
    (policy,) = [o for o in build(name) if o["kind"] == "NetworkPolicy"]
    templates = pod_templates(rayservice(name))
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= templates["head"]["metadata"][
        "labels"].items()
    assert spec["policyTypes"] == ["Ingress"]
    own, operator, anyone = spec["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "sdxl-turbo"}}}]}
    assert operator["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "kuberay-operator"}}}]
    assert {p["port"] for p in operator["ports"]} == {8265, 52365}
    assert "from" not in anyone
    assert {p["port"] for p in anyone["ports"]} == {8000, 8080}
    open_to_all = {p["port"] for p in anyone["ports"]}
    assert not {6379, 8265, 10001} & open_to_all
    # Every Ray pod of the app (both clusters of an upgrade) carries the label admitted.
    for template in templates.values():
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "sdxl-turbo"
    # And the head's own GCS and dashboard ports are the ones the policy guards.
    ports = {p["containerPort"] for p in templates["head"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= ports


@pytest.mark.parametrize("name", BUILDS)
def test_every_container_requests_and_limits_ephemeral_storage(name: str) -> None:
    found = 0
    for obj in build(name):
        for container in containers(obj):
            resources = container["resources"]
            assert "ephemeral-storage" in resources["requests"], (name, container["name"])
            assert "ephemeral-storage" in resources["limits"], (name, container["name"])
            found += 1
    assert found >= 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_model_pods_require_the_instance_type_they_are_sized_for(name: str) -> None:
    template = pod_templates(rayservice(name))["model"]["spec"]
    assert set(template["nodeSelector"]) == {"nodepool-label"}
    terms = template["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{
        "key": "node.kubernetes.io/instance-type", "operator": "In",
        "values": [params()["modelInstanceType"]]}]}]


def test_oss_fuse_mounts_get_a_liveness_check_that_reads_the_mount() -> None:
    service = rayservice("overlays/g8i-lite")
    source = AppConfig.model_validate(app_args(service)).model.source
    mounted = 0
    for template in pod_templates(service).values():
        for container in template["spec"]["containers"]:
            mounts = container.get("volumeMounts", [])
            if not mounts:
                assert "livenessProbe" not in container
                continue
            mounted += 1
            (mount,) = mounts
            probe = container["livenessProbe"]
            command = probe["exec"]["command"]
            assert command[:2] == ["/bin/sh", "-c"]
            assert f"{source}/model_index.json" in command[2]
            assert source.startswith(mount["mountPath"] + "/")
            assert command[2].startswith("timeout ")
            assert probe["timeoutSeconds"] > int(command[2].split()[1])
    assert mounted == 1
