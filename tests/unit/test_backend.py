import types

import pytest

from serve_app.model.backend import select_backend


def fake_ipex(version):
    return lambda: types.SimpleNamespace(__version__=version, optimize=lambda m, **_: m)


def missing():
    raise ImportError("No module named 'intel_extension_for_pytorch'")


def test_auto_uses_ipex_when_versions_match():
    choice = select_backend("auto", "2.8.0+cpu", import_ipex=fake_ipex("2.8.0+cpu"))
    assert choice.name == "ipex"
    assert choice.reason == "IPEX 2.8.0+cpu matches torch 2.8.0+cpu"


def test_auto_falls_back_when_versions_differ():
    choice = select_backend("auto", "2.13.0+cpu", import_ipex=fake_ipex("2.8.0+cpu"))
    assert choice.name == "torch"
    assert choice.reason == "IPEX 2.8.0+cpu does not match torch 2.13.0+cpu"


def test_auto_falls_back_when_ipex_is_missing():
    choice = select_backend("auto", "2.13.0", import_ipex=missing)
    assert choice.name == "torch"
    assert "ImportError" in choice.reason


def test_explicit_ipex_that_cannot_work_fails_loudly():
    with pytest.raises(RuntimeError, match="backend 'ipex' requested but IPEX 2.8.0 does not"):
        select_backend("ipex", "2.13.0", import_ipex=fake_ipex("2.8.0"))
    with pytest.raises(RuntimeError, match="backend 'ipex' requested but"):
        select_backend("ipex", "2.13.0", import_ipex=missing)


def test_torch_backend_never_imports_ipex():
    def boom():
        raise AssertionError("imported")

    assert select_backend("torch", "2.8.0", import_ipex=boom).name == "torch"


def test_gpu_replicas_use_torch():
    assert select_backend("auto", "2.8.0", device="cuda",
                          import_ipex=fake_ipex("2.8.0")).name == "torch"
    with pytest.raises(RuntimeError, match="for CPU replicas"):
        select_backend("ipex", "2.8.0", device="cuda", import_ipex=fake_ipex("2.8.0"))


def test_auto_with_profile_fast_runs_torch_where_its_int8_layers_measured_fastest():
    """avx2: torch with int8 UNet layers beat OpenVINO's fast pick in whole calls, so auto
    runs torch there under profile fast and keeps OpenVINO under quality; other classes
    keep their quality choice; an explicit backend is never second-guessed."""
    from serve_app.config import FAST_TORCH_INT8_MEASURED

    openvino = types.SimpleNamespace(__version__="2026.4.1")
    fast = select_backend("auto", "2.13.0", cpu_class="avx2", profile="fast",
                          import_ipex=missing, import_openvino=lambda: openvino)
    assert (fast.name, fast.reason) == (
        "torch", f"auto, profile fast: torch with int8 UNet layers measured fastest on avx2 "
                 f"CPUs ({FAST_TORCH_INT8_MEASURED['avx2']})")
    quality = select_backend("auto", "2.13.0", cpu_class="avx2", import_ipex=missing,
                             import_openvino=lambda: openvino)
    assert quality.name == "openvino"
    other = select_backend("auto", "2.13.0", cpu_class="avx512_bf16", profile="fast",
                           import_ipex=missing, import_openvino=lambda: openvino)
    assert other.name == "openvino"
    explicit = select_backend("openvino", "2.13.0", cpu_class="avx2", profile="fast",
                              import_openvino=lambda: openvino)
    assert explicit.name == "openvino"
    ipex = select_backend("auto", "2.8.0+cpu", cpu_class="avx2", profile="fast",
                          import_ipex=fake_ipex("2.8.0+cpu"))
    assert ipex.name == "ipex"


def test_the_real_environment_picks_torch_here():
    import torch

    choice = select_backend("auto", torch.__version__)
    assert choice.name == "torch"
