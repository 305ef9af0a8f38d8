"""Shared helpers for tests/kuberay: paths, overlay builds, object look-ups."""

from __future__ import annotations

import copy
import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.kuberay import kustomize_lite

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "kuberay"
CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayservices.v1.7.0.yaml"
PRODUCTION = REPO / "configs" / "production.yaml"
# Every kustomization that can be built on its own (storage/, params/ and placement/ are
# components: they are built inside these).
BUILDS = ("base", "overlays/g8i", "overlays/tdx", "overlays/g8i-lite", "openvino-export",
          "tdx-check")
OVERLAYS = ("overlays/g8i", "overlays/tdx", "overlays/g8i-lite")
KUBERNETES_VERSION = "1.33.0"   # ACK's current line; kubernetes-validate ships its schemas
TDX_LABEL = {"nodepool-label": "tdx-vm-pool"}
G8I_LABEL = {"nodepool-label": "g8i-pool"}
KUBECTL = shutil.which("kubectl")


def kubectl_build(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


@functools.cache
def _build(name: str) -> tuple[dict[str, Any], ...]:
    path = KUBERAY / name
    objects = kubectl_build(path) if KUBECTL else kustomize_lite.render(path)
    return tuple(objects)


def build(name: str) -> list[dict[str, Any]]:
    """`kubectl kustomize kuberay/<name>`, or the pure-Python renderer without kubectl."""
    return copy.deepcopy(list(_build(name)))


def rayservice(name: str) -> dict[str, Any]:
    found = [o for o in build(name) if o["kind"] == "RayService"]
    assert len(found) == 1, [o["kind"] for o in build(name)]
    return found[0]


def pod_templates(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """group name ('head', 'ingress', 'model') -> pod template."""
    cluster = service["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def worker_group(service: dict[str, Any], name: str) -> dict[str, Any]:
    groups = [g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
              if g["groupName"] == name]
    assert len(groups) == 1
    return groups[0]


def serve_config(service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def app_args(service: dict[str, Any]) -> dict[str, Any]:
    apps = serve_config(service)["applications"]
    assert len(apps) == 1
    return apps[0]["args"]


def generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kuberay_generate", KUBERAY / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantity_bytes(value: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def quantity_cpus(value: str | int) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def all_yaml_files() -> list[Path]:
    return sorted(p for p in KUBERAY.rglob("*") if p.suffix in (".yaml", ".yml"))
