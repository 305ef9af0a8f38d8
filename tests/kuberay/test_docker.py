"""The Dockerfile agrees with pyproject.toml and with the images the manifests run.

No image is built here (no container engine in CI); these are static checks."""

from __future__ import annotations

import re

import pytest

from tests.kuberay.manifests import REPO, pod_templates, rayservice

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

DOCKERFILE = REPO / "docker" / "Dockerfile"


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
    assert f"assert ray.__version__ == '{ray_version}'" in text


def test_torch_comes_from_the_cpu_extra() -> None:
    text = DOCKERFILE.read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    torch_version = _dependency_pin(extras["cpu"], "torch")
    assert 'RUN pip install ".[cpu,s3]"' in text
    assert f"== '{torch_version}'" in text
    assert "torch.version.cuda is None" in text
    assert "latest" not in text


def test_two_targets_non_root_and_weights_where_the_config_points() -> None:
    text = DOCKERFILE.read_text()
    assert re.findall(r"(?m)^FROM (.+)$", text) == ["${RAY_IMAGE} AS lite", "lite AS full"]
    # root only to install the allocator; everything after runs as the non-root user.
    assert re.findall(r"(?m)^USER (.+)$", text) == ["root", "1000:100"]
    assert "COPY --from=weights --chown=1000:100 . /models/sdxl-turbo" in text


def test_manifest_images_name_the_targets() -> None:
    for overlay, target in (("overlays/g8i", "full"), ("overlays/tdx", "full"),
                            ("overlays/g8i-lite", "lite")):
        images = {t["spec"]["containers"][0]["image"]
                  for t in pod_templates(rayservice(overlay)).values()}
        assert images == {
            f"registry.example.com/sdxl-turbo/sdxl-turbo-serve:0.1.0-ray2.60.0-{target}"}


def test_tcmalloc_is_installed_and_preloaded_for_every_process() -> None:
    text = DOCKERFILE.read_text()
    library = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    assert "apt-get install -y --no-install-recommends libtcmalloc-minimal4" in text
    assert f"test -f {library}" in text  # the build fails if the path moved
    assert re.findall(r"(?m)^ENV LD_PRELOAD=(\S+)$", text) == [library]
    assert text.index("libtcmalloc-minimal4") < text.index("USER 1000:100")
