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


def test_the_real_environment_picks_torch_here():
    import torch

    choice = select_backend("auto", torch.__version__)
    assert choice.name == "torch"
