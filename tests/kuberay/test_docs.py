"""README.md and kuberay/README.md say what the manifests and the Dockerfile do: the Secrets to
create, the node-pool label, the shutdown and upgrade numbers, the torch install."""

from __future__ import annotations

import re

import pytest

from tests.kuberay.manifests import (
    BUILDS,
    KUBERAY,
    OVERLAYS,
    REPO,
    build,
    pod_templates,
    rayservice,
)

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

README = REPO / "README.md"
KUBERAY_README = KUBERAY / "README.md"


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def referenced_secrets() -> set[str]:
    names = set()
    for name in BUILDS:
        for obj in build(name):
            for key, value in _walk(obj):
                if key == "secretKeyRef":
                    names.add(value["name"])
                elif key == "imagePullSecrets":
                    names.update(ref["name"] for ref in value)
                elif key == "authOptions":
                    names.add(value["secretName"])
                elif key == "nodePublishSecretRef":
                    names.add(value["name"])
    return names


def test_every_secret_the_manifests_name_is_created_in_the_readme() -> None:
    names = referenced_secrets()
    assert names == {"sdxl-turbo-ray-token", "sdxl-turbo-oss-images", "sdxl-turbo-redis",
                     "sdxl-turbo-jobs-redis", "sdxl-turbo-registry"}
    text = KUBERAY_README.read_text()
    created = set(re.findall(
        r"kubectl create secret (?:generic|docker-registry) (sdxl-turbo-[a-z-]+)", text))
    assert names <= created


def test_node_pool_label_is_set_in_the_pool_config_with_existing_nodes_updated() -> None:
    text = " ".join(KUBERAY_README.read_text().split())
    for overlay in OVERLAYS:
        for template in pod_templates(rayservice(overlay)).values():
            ((key, value),) = template["spec"]["nodeSelector"].items()
            assert f"`{key}: {value}`" in text
    assert "node label set in the **node pool's configuration**" in text
    assert "update the labels (and taints) of the existing nodes" in text
    assert "`kubectl get nodes -L nodepool-label`" in text


def test_tdx_node_check_is_documented() -> None:
    text = KUBERAY_README.read_text()
    assert "kubectl apply -k kuberay/tdx-check" in text
    assert "`/dev/tdx_guest` is not visible" in text
    assert '"detect_tee: tdx"' in text


def test_readmes_state_the_shutdown_and_upgrade_numbers_of_the_manifests() -> None:
    service = rayservice("overlays/g8i")
    text = " ".join(KUBERAY_README.read_text().split())
    delay = service["spec"]["rayClusterDeletionDelaySeconds"]
    timeout = service["metadata"]["annotations"]["ray.io/initializing-timeout"]
    model = pod_templates(service)["model"]["spec"]
    drain = {e["name"]: e.get("value") for e in model["containers"][0]["env"]}[
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]
    assert f"`rayClusterDeletionDelaySeconds: {delay}`" in text
    assert f'`ray.io/initializing-timeout: "{timeout}"`' in text
    assert f"`RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S` ({drain} s)" in text
    assert f"`terminationGracePeriodSeconds: {model['terminationGracePeriodSeconds']}`" in text
    # The blanket claim went; what is lost is listed instead.
    for readme in (README, KUBERAY_README):
        assert "no request is dropped" not in readme.read_text().lower()
    assert "What an upgrade can lose, exactly:" in text
    assert "What is lost, by pod:" in text


def test_readmes_install_torch_from_the_cpu_index() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (pin,) = [r for r in extras["cpu"] if r.startswith("torch==")]
    command = f"pip install --index-url https://download.pytorch.org/whl/cpu {pin}"
    assert f".venv/bin/{command}" in README.read_text()
    assert " ".join(command.split()) in " ".join(KUBERAY_README.read_text().split())


def test_node_disk_is_stated() -> None:
    text = " ".join(KUBERAY_README.read_text().split())
    assert "**Node disk (estimate).**" in text
    assert "at least 120 GiB for the container runtime" in text


def _layout_block() -> str:
    text = KUBERAY_README.read_text()
    start = text.index("```\nkuberay/\n")
    return text[start:text.index("```", start + 3)]


def test_the_layout_lists_every_part_of_kuberay() -> None:
    """Issue 20: openvino-export/ was missing from the layout."""
    block = _layout_block()
    listed = set(re.findall(r"(?m)^  ([a-z][a-z0-9_.-]*(?:/[a-z0-9_.-]*)?)(?:/|\s)", block))
    entries = {p.name for p in KUBERAY.iterdir()
               if p.name != "README.md" and not p.name.startswith((".", "__"))}
    for entry in entries:
        assert entry in listed or f"{entry}/" in block, entry
    for overlay in OVERLAYS:
        assert f"{overlay}/" in block, overlay
    for component in ("placement/g8i", "storage", "params"):
        assert (KUBERAY / component / "kustomization.yaml").is_file()


def test_the_readme_walks_through_a_rollout_an_upgrade_and_a_maintenance() -> None:
    text = " ".join(KUBERAY_README.read_text().split())
    rollout = text.index("## 2. Deploy (the first rollout)")
    upgrade = text.index("**An upgrade, step by step**")
    maintenance = text.index("**A node-pool maintenance, step by step**")
    assert "python kuberay/upgrade.py kuberay/overlays/g8i" in text[rollout:]
    assert "python kuberay/upgrade.py kuberay/overlays/g8i" in text[upgrade:]
    assert "**a user keeps the capacity that was running when the upgrade was applied**" in text
    assert "Capacity kept:" in text[upgrade:] and "Jobs: none lost." in text[upgrade:]
    assert "What survives:" in text[maintenance:]
    assert "Not proven here:" in text[maintenance:]
    # The numbers the walkthroughs quote are the manifests'.
    service = rayservice("overlays/g8i")
    for group, template in pod_templates(service).items():
        spec = template["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        drain, grace = env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"], spec[
            "terminationGracePeriodSeconds"]
        if group == "model":
            assert f"`RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S` ({drain} s)" in text
        else:
            assert f"Ingress pods and the head: {drain} s and {grace} s." in text
    budgets = {o["metadata"]["name"] for o in build("overlays/g8i")
               if o["kind"] == "PodDisruptionBudget"}
    for name in budgets:
        assert f"`{name}`" in text
    assert "`sdxl-turbo-head`" not in text
    assert "kubectl get rayservice sdxl-turbo" in text[maintenance:]
