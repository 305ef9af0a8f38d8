"""The layout is the architecture: each package imports only what its room allows.

The ingress side (HTTP), the generation core, batching and jobs never import torch,
diffusers, transformers or PIL, nor the model package: they run on small ingress pods, and
importing torch there would cost seconds and hundreds of MB for nothing. Checked per
package by reading every module's imports (function-level ones too), and once more by
importing the app builder.

Packages depend downward only: the shared top-level modules at the bottom; the generation
core, batching and the model beside each other above them; jobs over the generation core;
the HTTP ingress over both; app.py on top. No package cycle, and no module cycle either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "serve_app"
HEAVY = ("torch", "diffusers", "transformers", "PIL", "safetensors", "accelerate")
# Packages (or top-level shared modules) and what they may not import.
LIGHT = {
    "ingress": HEAVY + ("serve_app.model", "serve_app.bench"),
    "generation": HEAVY + ("serve_app.model", "serve_app.bench", "serve_app.ingress",
                           "serve_app.jobs", "serve_app.batching"),
    "batching": HEAVY + ("serve_app.model", "serve_app.ingress", "serve_app.bench"),
    "jobs": HEAVY + ("serve_app.model", "serve_app.bench"),
    # Shared by every deployment.
    "app.py": HEAVY + ("serve_app.bench",),
    "config.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "protocol.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "errors.py": HEAVY + ("serve_app.model", "serve_app.bench"),
    "store.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "metrics.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "tee.py": HEAVY + ("serve_app.ingress", "serve_app.bench"),
    # Confidential mode's checks; outbound calls to client-given URLs (callbacks; ingress-side
    # fetches): stdlib only.
    "confidential.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "outbound.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "imaging.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "plugins.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "ray_compat.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
}
# The shared modules: the bottom layer, below every package.
SHARED = frozenset({"config", "errors", "metrics", "protocol", "store", "imaging", "plugins",
                    "tee", "ray_compat", "confidential", "outbound"})
# Per package (or top-level module), the packages it may import besides itself: downward
# edges only. Anything else (jobs -> ingress, model -> batching, ...) climbs back up.
MAY_IMPORT: dict[str, frozenset[str]] = {
    **{shared: SHARED for shared in SHARED},
    "generation": SHARED,
    "batching": SHARED,
    "model": SHARED,
    "jobs": SHARED | {"generation"},
    "ingress": SHARED | {"generation", "jobs"},
    "app": SHARED | {"ingress", "batching", "jobs", "model"},
    "bench": SHARED | {"model"},
    "testing": SHARED,
    "assets": frozenset(),
}


def imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph() -> dict[str, set[str]]:
    """serve_app's modules and the serve_app modules each imports (function-level imports
    too). `from a.b import c` is an edge to a.b.c when that is a module, else to a.b;
    relative imports are resolved."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                           for alias in node.names]
            for target in targets:
                while target and target not in paths and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in paths and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def unit_of(module: str) -> str:
    """The room a module is in: its package under serve_app, or its own name when it is a
    top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        if module == "serve_app":
            continue
        unit = unit_of(module)
        graph.setdefault(unit, set()).update(
            unit_of(t) for t in targets if t != "serve_app" and unit_of(t) != unit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (its nodes, first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_packages_depend_downward_only():
    graph = package_graph()
    assert set(graph) <= set(MAY_IMPORT), sorted(set(graph) - set(MAY_IMPORT))
    upward = sorted(f"{unit} imports {target}" for unit, targets in graph.items()
                    for target in targets if target not in MAY_IMPORT[unit])
    assert upward == []


def test_no_package_cycle():
    assert find_cycle(package_graph()) is None


def test_no_module_cycle():
    """Not even inside a package (model/openvino/runtime.py and model/pipeline.py once
    imported each other)."""
    assert find_cycle(module_graph()) is None


def test_the_model_package_borrows_nothing_from_the_other_rooms():
    """What the model replicas share with the rest (record names, PNG encoding, the backlog
    metric, the factory loader) lives in the shared modules."""
    graph = package_graph()
    assert graph["model"] <= SHARED, sorted(graph["model"] - SHARED)


def private_reaches(path: Path) -> list[str]:
    """`x._name` where x is not self or cls: a reach into another object's internals."""
    reaches = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            reaches.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
        elif (isinstance(node, ast.Attribute) and node.attr == "__dict__"
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            reaches.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .__dict__")
    return reaches


def test_ray_internals_are_reached_from_ray_compat_only():
    """Every module that imports Ray, but ray_compat.py, reaches no other object's private
    attribute (serve_app/ray_compat.py holds them, each with a test against the installed
    Ray)."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "ray_compat.py" or "bench" in path.relative_to(PACKAGE).parts:
            continue
        if any(name == "ray" or name.startswith("ray.") for name in imported_modules(path)):
            offences.extend(private_reaches(path))
    assert offences == []
    assert private_reaches(PACKAGE / "ray_compat.py") != []  # the check sees what it seeks


def modules_of(entry: str) -> list[Path]:
    path = PACKAGE / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("entry", sorted(LIGHT))
def test_light_packages_import_nothing_heavy(entry):
    forbidden = LIGHT[entry]
    offences = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in modules_of(entry)
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert offences == []


def test_every_module_is_in_a_room():
    """A new top-level module must be placed: in a package, or listed above as shared."""
    top = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py", "testing.py"}
    assert top <= set(LIGHT), sorted(top - set(LIGHT))
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == {"ingress", "generation", "batching", "jobs", "model", "bench",
                        "assets"}


def test_building_the_app_loads_no_torch():
    code = (
        "import sys, serve_app.app, serve_app.ingress.deployment\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'PIL', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# What a replica of each deployment imports when Ray builds it (the module of its class, in
# a worker process of its own), and the controller's autoscaling policies. None may pull in
# the model's libraries: seconds of CPU each at every start, on the quick start's critical
# path (BENCHMARKS.md, "Quick start").
REPLICA_MODULES = ("serve_app.ingress.deployment", "serve_app.batching.deployment",
                   "serve_app.jobs.consumer", "serve_app.jobs.broker",
                   "serve_app.batching.autoscaling", "serve_app.model.deployment")
MODEL_LIBRARIES = HEAVY + ("openvino", "nncf", "huggingface_hub", "optimum")


@pytest.mark.parametrize("module", REPLICA_MODULES)
def test_a_replica_module_imports_no_model_library(module):
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
