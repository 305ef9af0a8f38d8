"""A tiny pure-Python renderer for the subset of kustomize that kuberay/ uses.

Used only when `kubectl` is not on PATH, so the overlay tests still build every overlay.
Supported: `resources` (YAML files and directories holding a kustomization) and `patches`
with a JSON6902 patch (inline `patch` or `path`) and a `target` of kind/name. Anything
else raises UnsupportedKustomization, so a kustomization that outgrows this renderer fails
loudly instead of rendering wrongly. When kubectl is present, tests/kuberay checks that
this renderer and `kubectl kustomize` produce the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches"}
SUPPORTED_TARGET_KEYS = {"kind", "name"}


class UnsupportedKustomization(Exception):
    pass


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise UnsupportedKustomization(f"{directory}: no kustomization file")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise UnsupportedKustomization(f"JSON pointer must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _parent(doc: Any, parts: list[str]) -> Any:
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent = _parent(doc, parts)
        key = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            if kind == "add":
                index = len(parent) if key == "-" else int(key)
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[int(key)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[int(key)]
            else:
                raise UnsupportedKustomization(f"JSON6902 op {kind!r}")
        else:
            if kind == "add":
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "replace":
                if key not in parent:
                    raise KeyError(f"replace of missing {op['path']}")
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            else:
                raise UnsupportedKustomization(f"JSON6902 op {kind!r}")
    return doc


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    unknown = set(target) - SUPPORTED_TARGET_KEYS
    if unknown:
        raise UnsupportedKustomization(f"patch target keys {sorted(unknown)}")
    return all(
        (key == "kind" and obj.get("kind") == value)
        or (key == "name" and obj.get("metadata", {}).get("name") == value)
        for key, value in target.items()
    )


def render(directory: Path | str) -> list[dict[str, Any]]:
    directory = Path(directory)
    spec = yaml.safe_load(_kustomization_file(directory).read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported keys {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    for patch in spec.get("patches", []):
        if "patch" in patch:
            ops = yaml.safe_load(patch["patch"])
        else:
            ops = yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise UnsupportedKustomization(f"{directory}: only JSON6902 (list) patches")
        target = patch.get("target")
        if not target:
            raise UnsupportedKustomization(f"{directory}: a JSON6902 patch needs a target")
        hits = [i for i, obj in enumerate(objects) if _matches(obj, target)]
        if not hits:
            raise UnsupportedKustomization(f"{directory}: patch target {target} matched nothing")
        for i in hits:
            objects[i] = apply_json6902(objects[i], ops)
    return objects
