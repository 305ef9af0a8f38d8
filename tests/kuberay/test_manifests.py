"""Every manifest parses and builds; the RayService matches KubeRay 1.7's CRD schema; pod
templates and plain objects match the Kubernetes schemas (strict); security settings."""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.kuberay import kustomize_lite
from tests.kuberay.manifests import (
    BUILDS,
    CRD,
    G8I_LABEL,
    KUBECTL,
    KUBERAY,
    KUBERNETES_VERSION,
    OVERLAYS,
    all_yaml_files,
    build,
    kubectl_build,
    pod_templates,
    rayservice,
)


def test_every_yaml_file_parses() -> None:
    files = all_yaml_files()
    assert len(files) == 23
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        for doc in docs:
            assert isinstance(doc, (dict, list)), path


@pytest.mark.parametrize("name", BUILDS)
def test_build_parses(name: str) -> None:
    kinds = sorted(o["kind"] for o in build(name))
    # Two budgets (ingress, model: the head has none, issue 20) and the head's
    # NetworkPolicy; the params object (local-config) is never in a build.
    app = ["NetworkPolicy"] + ["PodDisruptionBudget"] * 2
    expected = {
        "base": app + ["RayService"],
        "overlays/g8i": app + ["RayService"],
        "overlays/tdx": app + ["RayService"],
        "overlays/g8i-lite": ["NetworkPolicy", "PersistentVolume", "PersistentVolumeClaim"]
        + ["PodDisruptionBudget"] * 2 + ["RayService"],
        "openvino-export": ["Job", "PersistentVolume", "PersistentVolumeClaim"],
        "tdx-check": ["Pod"],
    }[name]
    assert kinds == expected


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH: nothing to compare the "
                    "pure-Python renderer with (the other tests use that renderer)")
@pytest.mark.parametrize("name", BUILDS)
def test_fallback_renderer_equals_kubectl_kustomize(name: str) -> None:
    by_kubectl = {_key(o): o for o in kubectl_build(KUBERAY / name)}
    by_python = {_key(o): o for o in kustomize_lite.render(KUBERAY / name)}
    assert by_python == by_kubectl


def test_fallback_renderer_refuses_what_it_does_not_implement(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnameSuffix: -x\n")
    with pytest.raises(kustomize_lite.UnsupportedKustomization, match="nameSuffix"):
        kustomize_lite.render(tmp_path)


def test_tdx_label_is_overridable_by_a_further_overlay(tmp_path) -> None:
    """The documented override: an overlay on top of overlays/tdx replacing the label."""
    ops = "".join(
        f"  - op: replace\n    path: {path}/template/spec/nodeSelector\n"
        f"    value: {{nodepool-label: my-tdx-pool}}\n"
        for path in ("/spec/rayClusterConfig/headGroupSpec",
                     "/spec/rayClusterConfig/workerGroupSpecs/0",
                     "/spec/rayClusterConfig/workerGroupSpecs/1")
    )
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {os.path.relpath(KUBERAY / 'overlays' / 'tdx', tmp_path)}\n"
        "patches:\n  - target: {kind: RayService, name: sdxl-turbo}\n    patch: |-\n"
        + "\n".join("    " + line for line in ops.splitlines()) + "\n"
    )
    objects = kubectl_build(tmp_path) if KUBECTL else kustomize_lite.render(tmp_path)
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    selectors = [t["spec"]["nodeSelector"] for t in pod_templates(service).values()]
    assert selectors == [{"nodepool-label": "my-tdx-pool"}] * 3


# --- the CRD schema -------------------------------------------------------------------------

def _strict(schema: Any) -> Any:
    """The CRD's structural schema with unknown fields rejected (kubectl --validate=strict).

    Kubernetes prunes unknown fields silently; adding additionalProperties: false wherever
    the schema lists properties (and does not preserve unknown fields) makes a typo fail."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    if not CRD.is_file():
        pytest.fail(f"KubeRay CRD schema missing: {CRD} (shared/ beside the repository)")
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_rayservice_validates_against_kuberay_1_7_crd(name, crd_validator) -> None:
    service = rayservice(name)
    assert service["apiVersion"] == "ray.io/v1"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in crd_validator.iter_errors(service)]
    assert errors == []


def test_crd_validation_rejects_a_typo(crd_validator) -> None:
    service = rayservice("overlays/g8i")
    service["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    service["spec"]["upgradeStrategy"]["clusterUpgradeOptions"] = {"gatewayClassName": "x"}
    messages = sorted(e.message for e in crd_validator.iter_errors(service))
    assert len(messages) == 3
    assert any("'enableInTreeAutoscalling' was unexpected" in m for m in messages)
    assert any("'intervalSeconds' is a required property" in m for m in messages)
    assert any("'stepSizePercent' is a required property" in m for m in messages)


def test_token_auth_and_upgrade_strategy_use_crd_fields() -> None:
    spec = rayservice("overlays/g8i")["spec"]
    assert spec["rayClusterConfig"]["authOptions"] == {
        "mode": "token", "secretName": "sdxl-turbo-ray-token"}
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert spec["rayClusterConfig"]["rayVersion"] == "2.60.0"


# --- Kubernetes schemas (kubernetes-validate, strict) ------------------------------------

def _as_pod(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_pod_templates_validate_strictly(name: str) -> None:
    templates = pod_templates(rayservice(name))
    assert sorted(templates) == ["head", "ingress", "model"]
    for group, template in templates.items():
        kubernetes_validate.validate(_as_pod(f"sdxl-turbo-{group}", template),
                                     KUBERNETES_VERSION, strict=True)


def test_pod_validation_rejects_a_typo() -> None:
    template = copy.deepcopy(pod_templates(rayservice("overlays/g8i"))["model"])
    template["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonroot"):
        kubernetes_validate.validate(_as_pod("x", template), KUBERNETES_VERSION, strict=True)


def test_storage_objects_validate_strictly() -> None:
    # storage/ is a component (its values come from kuberay/params): built in g8i-lite.
    objects = [o for o in build("overlays/g8i-lite")
               if o["kind"] in ("PersistentVolume", "PersistentVolumeClaim")]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    pv = next(o for o in objects if o["kind"] == "PersistentVolume")
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pv["spec"]["csi"]["driver"] == "ossplugin.csi.alibabacloud.com"
    assert pv["spec"]["csi"]["volumeHandle"] == pv["metadata"]["name"]
    # RRSA, no Secret: nothing in the cluster-scoped PV names a namespace (test_rollout).
    assert "nodePublishSecretRef" not in pv["spec"]["csi"]
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert pvc["spec"]["selector"]["matchLabels"] == pv["metadata"]["labels"]
    # And by name, which a namePrefix renames with the PV (the label it keeps).
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]


def test_lite_overlay_mounts_the_claim_where_model_source_points() -> None:
    service = rayservice("overlays/g8i-lite")
    templates = pod_templates(service)
    # Only the model pods read (and check) the weights; the head no longer does (issue 20).
    for group in ("model",):
        spec = templates[group]["spec"]
        assert spec["volumes"] == [{"name": "model-weights", "persistentVolumeClaim": {
            "claimName": "sdxl-turbo-weights", "readOnly": True}}]
        assert spec["containers"][0]["volumeMounts"] == [
            {"name": "model-weights", "mountPath": "/models", "readOnly": True}]
    assert "volumes" not in templates["ingress"]["spec"]
    assert "volumes" not in templates["head"]["spec"]
    for template in templates.values():
        assert template["spec"]["containers"][0]["image"].endswith("-lite")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["model"]["source"] == "/models/sdxl-turbo"


# --- security -------------------------------------------------------------------------------

def _containers(service: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for template in pod_templates(service).values():
        out += template["spec"].get("initContainers", []) + template["spec"]["containers"]
    return out


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_pods_run_non_root_without_capabilities(name: str) -> None:
    service = rayservice(name)
    for template in pod_templates(service).values():
        pod_sc = template["spec"]["securityContext"]
        assert pod_sc["runAsNonRoot"] is True
        assert pod_sc["runAsUser"] == 1000
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert template["spec"].get("hostNetwork", False) is False
    containers = _containers(service)
    assert len(containers) == 3
    for container in containers:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc.get("privileged", False) is False
        assert sc.get("runAsUser", 1000) == 1000
    autoscaler = service["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler == {"runAsNonRoot": True, "runAsUser": 1000,
                          "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


IMAGE = re.compile(r"^[a-z0-9.\-/:]+:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})$")


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_images_are_pinned(name: str) -> None:
    for container in _containers(rayservice(name)):
        match = IMAGE.match(container["image"])
        assert match is not None, container["image"]
        assert match["tag"] != "latest"
        assert "2.60.0" in match["tag"]
        assert container["imagePullPolicy"] == "IfNotPresent"


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}/{key}", key, value
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


@pytest.mark.parametrize("name", BUILDS)
def test_no_inline_secrets(name: str) -> None:
    objects = build(name)
    assert [o for o in objects if o["kind"] == "Secret"] == []
    refs = []
    for obj in objects:
        for path, key, value in _walk(obj):
            if key == "env":
                for var in value:
                    sensitive = re.search(r"KEY|SECRET|TOKEN|PASSWORD", var["name"])
                    if sensitive:
                        assert "value" not in var, path
                        assert set(var["valueFrom"]) == {"secretKeyRef"}, path
                        refs.append(var["valueFrom"]["secretKeyRef"]["name"])
            assert key not in ("stringData", "akSecret", "akId"), path
    if name in ("base",) + OVERLAYS:
        # Two keys each for the ingress and the model group (job progress in the bucket).
        assert refs == ["sdxl-turbo-oss-images"] * 4


def test_secret_references_by_name_only_in_raw_files() -> None:
    pattern = re.compile(r"(?im)^\s*(kind:\s*Secret|stringData:|data:)\s*$")
    for path in all_yaml_files():
        assert pattern.search(path.read_text()) is None, path


def test_openvino_export_job_writes_where_the_replicas_read() -> None:
    """The optional export Job (kuberay/openvino-export): strictly valid objects; the same
    bucket path as the read-only weights volume; the source the serve config names; the
    lite image the g8i-lite overlay runs; non-root; a memory limit above the measured
    export peak (15.8-16.6 GB, BENCHMARKS.md)."""
    objects = build("openvino-export")
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Job", "PersistentVolume", "PersistentVolumeClaim"]
    writer = next(o for o in objects if o["kind"] == "PersistentVolume")
    reader = next(o for o in build("overlays/g8i-lite") if o["kind"] == "PersistentVolume")
    attrs, read_attrs = writer["spec"]["csi"]["volumeAttributes"], reader["spec"]["csi"][
        "volumeAttributes"]
    assert (attrs["bucket"], attrs["url"], attrs["path"]) == (
        read_attrs["bucket"], read_attrs["url"], read_attrs["path"])
    assert "fuseType" not in attrs  # ossfs 1.0 writes; ossfs 2.0 is read-only here
    assert writer["spec"]["accessModes"] == ["ReadWriteMany"]
    job = next(o for o in objects if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    production = yaml.safe_load(open("configs/production.yaml"))["applications"][0]["args"]
    assert container["command"] == ["sdxl-turbo-export"]
    assert container["args"] == ["--source", production["model"]["source"],
                                 "--dtype", "bfloat16"]
    [mount] = container["volumeMounts"]
    assert production["model"]["source"].startswith(mount["mountPath"] + "/")
    assert pod["volumes"] == [{"name": mount["name"], "persistentVolumeClaim": {
        "claimName": "sdxl-turbo-weights-writer"}}]
    lite = rayservice("overlays/g8i-lite")["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    assert container["image"] == lite["template"]["spec"]["containers"][0]["image"]
    assert pod["nodeSelector"] == G8I_LABEL
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"]["memory"] == "24Gi"
