"""The layout is the architecture: each package imports only what its room allows.

The ingress side (HTTP), batching and jobs never import torch, diffusers, transformers or
PIL, nor the model package: they run on small ingress pods, and importing torch there
would cost seconds and hundreds of MB for nothing. Checked per package by reading every
module's imports (function-level ones too), and once more by importing the app builder.
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
    # Outbound calls to client-given URLs (callbacks; ingress-side fetches): stdlib only.
    "confidential.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
    "outbound.py": HEAVY + ("serve_app.ingress", "serve_app.model", "serve_app.bench"),
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
    assert packages == {"ingress", "batching", "jobs", "model", "bench", "assets"}


def test_building_the_app_loads_no_torch():
    code = (
        "import sys, serve_app.app, serve_app.ingress.deployment\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'PIL', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
