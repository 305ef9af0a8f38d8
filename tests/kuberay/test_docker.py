"""The Dockerfile agrees with pyproject.toml and with the images the manifests run.

No image is built here (no container engine in CI); these are static checks."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from tests.kuberay.manifests import REPO, pod_templates, rayservice

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

DOCKERFILE = REPO / "docker" / "Dockerfile"
CHECK_IMAGE = REPO / "docker" / "check_image.py"


def _dependency_pin(requirements: list[str], name: str) -> str:
    (line,) = [r for r in requirements if re.match(rf"^{re.escape(name)}(\[|==)", r)]
    return line.split("==", 1)[1]


def test_base_image_matches_the_ray_pin() -> None:
    text = DOCKERFILE.read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_version = _dependency_pin(project["dependencies"], "ray")
    assert re.findall(r"(?m)^ARG RAY_IMAGE=(\S+)$", text) == [
        f"rayproject/ray:{ray_version}-py311-cpu"]
    assert ray_version == "2.60.0"
    # The build checks the installed Ray against the same pin (check_image.pins, tested below).


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def run_commands(text: str) -> list[list[str]]:
    """Every shell command of every RUN (split on &&), as argv lists, in order."""
    return [shlex.split(command) for keyword, args in instructions(text) if keyword == "RUN"
            for command in args.split("&&")]


def test_torch_is_the_cpu_build_from_pytorchs_index_before_the_project() -> None:
    text = DOCKERFILE.read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    torch_version = _dependency_pin(extras["cpu"], "torch")
    pips = [argv for argv in run_commands(text) if argv[:2] == ["pip", "install"]]
    # On the public index torch==2.13.0 for Linux x86_64 is the CUDA build: torch must come
    # from PyTorch's CPU index, as the only index (an extra index lets pip pick PyPI's CUDA
    # wheel), before the project, whose `cpu` extra then finds the pin satisfied.
    assert pips == [
        ["pip", "install", "--index-url", "https://download.pytorch.org/whl/cpu",
         f"torch=={torch_version}"],
        ["pip", "install", ".[cpu,s3,openvino]"],
    ]
    assert not [a for argv in run_commands(text) for a in argv if "extra-index-url" in a]
    assert "latest" not in text


def test_build_fails_unless_the_installed_torch_is_a_cpu_build() -> None:
    text = DOCKERFILE.read_text()
    assert ("COPY", "--chown=1000:100 docker/check_image.py ./docker/check_image.py") in (
        instructions(text))
    commands = run_commands(text)
    check = ["python", "docker/check_image.py", "pyproject.toml"]
    assert commands.count(check) == 1
    assert commands.index(check) > commands.index(["pip", "install", ".[cpu,s3,openvino]"])
    # Same RUN as the installs: the layer (and the build) fails with the check.
    (run,) = [args for keyword, args in instructions(text)
              if keyword == "RUN" and "check_image.py" in args]
    assert run.startswith("pip install --index-url")


def _check_image_module():
    spec = importlib.util.spec_from_file_location("check_image", CHECK_IMAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_check_rejects_cuda_torch_and_wrong_pins() -> None:
    check = _check_image_module()
    pins = check.pins((REPO / "pyproject.toml").read_text())
    assert pins == {"ray": "2.60.0", "torch": "2.13.0", "openvino": "2026.4.1"}
    cpu = {"ray": "2.60.0", "torch": "2.13.0+cpu", "openvino": "2026.4.1", "numpy": "2.3.0"}
    assert check.problems(pins, cpu, None) == []
    # What PyPI's torch==2.13.0 installs on Linux x86_64.
    cuda = {"ray": "2.60.0", "torch": "2.13.0", "openvino": "2026.4.1",
            "nvidia-cublas-cu12": "12.8.4.1",
            "cuda-toolkit": "12.8.1"}
    assert check.problems(pins, cuda, "12.8") == [
        "torch is a CUDA build (torch.version.cuda == '12.8')",
        "CUDA wheels installed: cuda-toolkit, nvidia-cublas-cu12",
    ]
    assert check.problems(pins, {"ray": "2.59.0", "openvino": "2026.4.1"}, None) == [
        "ray 2.59.0 installed, 2.60.0 pinned", "torch None installed, 2.13.0 pinned"]


def test_image_check_runs_and_judges_this_environment() -> None:
    """The build's check, run as the Dockerfile runs it, on the development environment: it
    passes exactly when that environment has the pinned Ray and a CPU torch (this repo's
    venv does), and otherwise names what is wrong."""
    import importlib.metadata

    import torch

    check = _check_image_module()
    installed = {d.metadata["Name"].lower(): d.version
                 for d in importlib.metadata.distributions()}
    expected = check.problems(check.pins((REPO / "pyproject.toml").read_text()), installed,
                              torch.version.cuda)
    result = subprocess.run([sys.executable, str(CHECK_IMAGE), str(REPO / "pyproject.toml")],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == (1 if expected else 0), result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("image check:")] == [
        f"image check: {problem}" for problem in expected]
    if not expected:
        assert result.stdout.startswith("image check: ray 2.60.0, torch 2.13.0")


def test_two_targets_non_root_and_weights_where_the_config_points() -> None:
    text = DOCKERFILE.read_text()
    assert re.findall(r"(?m)^FROM (.+)$", text) == ["${RAY_IMAGE} AS lite", "lite AS full"]
    # root only to install the allocator; everything after runs as the non-root user.
    assert re.findall(r"(?m)^USER (.+)$", text) == ["root", "1000:100"]
    assert "COPY --from=weights --chown=1000:100 . /models/sdxl-turbo" in text


def test_manifest_images_name_the_targets() -> None:
    """Only pods that read the weights from the image pull the full one: the model pods.
    The head (issue 20: a rescheduled head pulled 17.5 GB for a file check) and the ingress
    pods never load the model; the weights are checked where they are read."""
    image = "registry.example.com/sdxl-turbo/sdxl-turbo-serve:0.1.0-ray2.60.0-{}"
    for overlay, weights in (("overlays/g8i", "full"), ("overlays/tdx", "full"),
                             ("overlays/g8i-lite", "lite")):
        images = {group: t["spec"]["containers"][0]["image"]
                  for group, t in pod_templates(rayservice(overlay)).items()}
        assert images == {"head": image.format("lite"), "ingress": image.format("lite"),
                          "model": image.format(weights)}


def test_tcmalloc_is_installed_and_preloaded_for_every_process() -> None:
    text = DOCKERFILE.read_text()
    library = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    assert "apt-get install -y --no-install-recommends libtcmalloc-minimal4" in text
    assert f"test -f {library}" in text  # the build fails if the path moved
    assert re.findall(r"(?m)^ENV LD_PRELOAD=(\S+)$", text) == [library]
    assert text.index("libtcmalloc-minimal4") < text.index("USER 1000:100")


def test_workdir_is_owned_by_the_app_user_whatever_the_builder() -> None:
    """Issue 20: WORKDIR creates a missing directory as root with the legacy builder and
    kaniko; the directory is made, as root, owned by 1000:100 before USER and WORKDIR."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    (workdir,) = [line.split(None, 1)[1] for line in lines if line.startswith("WORKDIR ")]
    made = lines.index(f"RUN install -d -o 1000 -g 100 {workdir}")
    assert lines.index("USER root") < made < lines.index("USER 1000:100") < lines.index(
        f"WORKDIR {workdir}")


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    import fnmatch

    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
                   or fnmatch.fnmatch(prefix, pattern)
                   for pattern in patterns for prefix in prefixes)

    copied = re.findall(r"(?m)^COPY --chown=1000:100 (.+) \S+$", DOCKERFILE.read_text())
    sources = [src for line in copied for src in line.split()]
    assert sources == ["pyproject.toml", "README.md", "serve_app", "docker/check_image.py"]
    assert not any(ignored(src) for src in sources)
    for heavy in (".git", ".venv", "docker/weights/sdxl-turbo/unet", "tests", "kuberay",
                  "serve_app/__pycache__"):
        assert ignored(heavy), heavy
