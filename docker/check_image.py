"""Build-time check of the image's Python environment (docker/Dockerfile runs it).

Exits 1, failing the build, unless Ray and torch are the versions pyproject.toml pins, torch
is a CPU build (torch.version.cuda is None and no nvidia-*/cuda-* wheels are installed: the
public index's torch for Linux x86_64 is the CUDA build and pulls them), and the app imports.
tests/kuberay run the same script against the development environment.

    python docker/check_image.py [path/to/pyproject.toml]
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

CUDA_WHEEL = re.compile(r"^(nvidia|cuda)[-_.]", re.IGNORECASE)


def pins(pyproject: str) -> dict[str, str]:
    """{'ray': ..., 'torch': ..., 'openvino': ...}: the exact versions pyproject.toml pins
    for the image."""
    project = tomllib.loads(pyproject)["project"]

    def pin(requirements: list[str], name: str) -> str:
        (line,) = [r for r in requirements if re.match(rf"^{name}(\[[^\]]*\])?==", r)]
        return line.split("==", 1)[1].strip()

    # openvino too: the IR cache is keyed by its version, and `auto` may run it.
    return {"ray": pin(project["dependencies"], "ray"),
            "torch": pin(project["optional-dependencies"]["cpu"], "torch"),
            "openvino": pin(project["optional-dependencies"]["cpu"], "openvino")}


def problems(expected: dict[str, str], installed: dict[str, str],
             torch_cuda: str | None) -> list[str]:
    """What is wrong with an environment: installed maps distribution name -> version."""
    found = []
    for name, version in expected.items():
        have = installed.get(name)
        if have is None or have.split("+", 1)[0] != version:
            found.append(f"{name} {have} installed, {version} pinned")
    if torch_cuda is not None:
        found.append(f"torch is a CUDA build (torch.version.cuda == {torch_cuda!r})")
    cuda_wheels = sorted(n for n in installed if CUDA_WHEEL.match(n))
    if cuda_wheels:
        found.append(f"CUDA wheels installed: {', '.join(cuda_wheels)}")
    return found


def main(argv: list[str]) -> int:
    pyproject = Path(argv[0] if argv else "pyproject.toml").read_text()
    installed = {d.metadata["Name"].lower(): d.version
                 for d in importlib.metadata.distributions()}
    import torch

    import serve_app.app  # noqa: F401  (the app and its imports load)

    found = problems(pins(pyproject), installed, torch.version.cuda)
    for problem in found:
        print(f"image check: {problem}", file=sys.stderr)
    if not found:
        print(f"image check: ray {installed['ray']}, torch {installed['torch']} (CPU)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
