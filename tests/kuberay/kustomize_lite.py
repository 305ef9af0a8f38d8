"""A tiny pure-Python renderer for the subset of kustomize that kuberay/ uses.

Used only when `kubectl` is not on PATH, so the overlay tests still build every overlay.
Supported: `resources` (YAML files and directories holding a kustomization), `components`
(kind Component), `patches` with a JSON6902 patch (inline `patch` or `path`) and a
`target` of kind/name, `images` (name, newName, newTag), `replacements` (a source and
targets selected by kind/name; field paths with map keys, `[key]`, `[field=value]` and list
indexes; the options create, delimiter and index), `namePrefix` with `configurations`
holding nameReference field specs (plus the built-in references kuberay/ needs: a PVC's
volumeName, a Pod's or Job's claimName), and dropping `config.kubernetes.io/local-config`
objects from the output. Anything else raises UnsupportedKustomization, so a kustomization
that outgrows this renderer fails loudly instead of rendering wrongly. When kubectl is
present, tests/kuberay checks that this renderer and `kubectl kustomize` produce the same
objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "components", "images",
                  "replacements", "namePrefix", "configurations"}
LOCAL_CONFIG = "config.kubernetes.io/local-config"
# kustomize's built-in nameReference field specs that kuberay/ relies on.
BUILTIN_NAME_REFERENCES = [
    {"kind": "PersistentVolume", "fieldSpecs": [
        {"kind": "PersistentVolumeClaim", "path": "spec/volumeName"}]},
    {"kind": "PersistentVolumeClaim", "fieldSpecs": [
        {"kind": "Pod", "path": "spec/volumes/persistentVolumeClaim/claimName"},
        {"kind": "Job", "path": "spec/template/spec/volumes/persistentVolumeClaim/claimName"}]},
]
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


def _field_path(path: str) -> list[str]:
    """kustomize's dotted field path: `a.[b.c].d` keeps `b.c` whole."""
    parts, current, depth = [], "", 0
    for char in path:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _step(node: Any, part: str, create: bool) -> Any:
    if part.startswith("[") and part.endswith("]"):
        inner = part[1:-1]
        if "=" in inner and isinstance(node, list):
            key, value = inner.split("=", 1)
            found = [item for item in node if isinstance(item, dict) and item.get(key) == value]
            if len(found) != 1:
                raise KeyError(part)
            return found[0]
        part = inner
    if isinstance(node, list):
        return node[int(part)]
    if part not in node:
        if not create:
            raise KeyError(part)
        node[part] = {}
    return node[part]


def _get(obj: dict[str, Any], path: str) -> Any:
    node: Any = obj
    for part in _field_path(path):
        node = _step(node, part, create=False)
    return node


def _set(obj: dict[str, Any], path: str, value: Any, create: bool) -> bool:
    parts = _field_path(path)
    node: Any = obj
    try:
        for part in parts[:-1]:
            node = _step(node, part, create)
    except KeyError:
        return False
    last = parts[-1].strip("[]")
    if isinstance(node, list):
        node[int(last)] = value
        return True
    if last not in node and not create:
        return False
    node[last] = value
    return True


def _split_option(options: dict[str, Any]) -> tuple[str | None, int]:
    unknown = set(options) - {"create", "delimiter", "index"}
    if unknown:
        raise UnsupportedKustomization(f"replacement options {sorted(unknown)}")
    return options.get("delimiter"), int(options.get("index", 0))


def _replace(objects: list[dict[str, Any]], replacements: list[dict[str, Any]]) -> None:
    for replacement in replacements:
        if set(replacement) != {"source", "targets"}:
            raise UnsupportedKustomization(f"replacement keys {sorted(replacement)}")
        source = replacement["source"]
        unknown = set(source) - {"kind", "name", "fieldPath", "options"}
        if unknown:
            raise UnsupportedKustomization(f"replacement source keys {sorted(unknown)}")
        select = {k: source[k] for k in ("kind", "name") if k in source}
        (origin,) = [o for o in objects if _matches(o, select)]
        value = _get(origin, source.get("fieldPath", "metadata.name"))
        delimiter, index = _split_option(source.get("options", {}))
        if delimiter is not None:
            value = str(value).split(delimiter)[index]
        for target in replacement["targets"]:
            unknown = set(target) - {"select", "fieldPaths", "options"}
            if unknown:
                raise UnsupportedKustomization(f"replacement target keys {sorted(unknown)}")
            options = target.get("options", {})
            delimiter, index = _split_option(options)
            for obj in objects:
                if not _matches(obj, target["select"]):
                    continue
                for path in target["fieldPaths"]:
                    new = value
                    if delimiter is not None:
                        pieces = str(_get(obj, path)).split(delimiter)
                        pieces[index] = str(value)
                        new = delimiter.join(pieces)
                    _set(obj, path, copy.deepcopy(new), bool(options.get("create")))


def _images(objects: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    by_name = {}
    for image in images:
        unknown = set(image) - {"name", "newName", "newTag"}
        if unknown:
            raise UnsupportedKustomization(f"images keys {sorted(unknown)}")
        by_name[image["name"]] = image

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        name = container.get("image", "")
                        base = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
                        image = by_name.get(base)
                        if image is not None:
                            tag = image.get("newTag", name[len(base) + 1:] or None)
                            container["image"] = image.get("newName", base) + (
                                f":{tag}" if tag else "")
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for obj in objects:
        walk(obj)


def _rename_at(node: Any, parts: list[str], renames: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _rename_at(item, parts, renames)
        return
    if not isinstance(node, dict) or parts[0] not in node:
        return
    if len(parts) == 1:
        if node[parts[0]] in renames:
            node[parts[0]] = renames[node[parts[0]]]
        return
    _rename_at(node[parts[0]], parts[1:], renames)


def _name_prefix(objects: list[dict[str, Any]], prefix: str,
                 references: list[dict[str, Any]]) -> None:
    renames: dict[str, dict[str, str]] = {}
    for obj in objects:
        old = obj["metadata"]["name"]
        obj["metadata"]["name"] = prefix + old
        renames.setdefault(obj["kind"], {})[old] = prefix + old
    for reference in references:
        for spec in reference["fieldSpecs"]:
            for obj in objects:
                if obj["kind"] == spec["kind"]:
                    _rename_at(obj, spec["path"].split("/"),
                               renames.get(reference["kind"], {}))


def _build(directory: Path, objects: list[dict[str, Any]],
           references: list[dict[str, Any]], component: bool) -> None:
    """Adds the kustomization in `directory` to `objects` (a component transforms them)."""
    spec = yaml.safe_load(_kustomization_file(directory).read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported keys {sorted(unknown)}")
    if (spec.get("kind") == "Component") != component:
        raise UnsupportedKustomization(f"{directory}: a Component only under `components`")
    own: list[dict[str, Any]] = objects if component else []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            own.extend(_render(path, references))
        else:
            own.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    for entry in spec.get("components", []):
        _build((directory / entry).resolve(), own, references, component=True)
    for entry in spec.get("configurations", []):
        config = yaml.safe_load((directory / entry).read_text())
        if set(config) != {"nameReference"}:
            raise UnsupportedKustomization(f"{directory}: configurations {sorted(config)}")
        references.extend(config["nameReference"])
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
        hits = [i for i, obj in enumerate(own) if _matches(obj, target)]
        if not hits:
            raise UnsupportedKustomization(f"{directory}: patch target {target} matched nothing")
        for i in hits:
            own[i] = apply_json6902(own[i], ops)
    if "namePrefix" in spec:
        _name_prefix(own, spec["namePrefix"], BUILTIN_NAME_REFERENCES + references)
    _images(own, spec.get("images", []))
    _replace(own, spec.get("replacements", []))
    if not component:
        objects.extend(own)


def _render(directory: Path, references: list[dict[str, Any]]) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    _build(directory, objects, references, component=False)
    return objects


def render(directory: Path | str) -> list[dict[str, Any]]:
    objects = _render(Path(directory), [])
    return [o for o in objects
            if o.get("metadata", {}).get("annotations", {}).get(LOCAL_CONFIG) != "true"]
