import pytest

from serve_app.errors import Unauthorized
from serve_app.ingress.auth import ApiKeys
from serve_app.tee import TeeRequiredError, check_tee, detect_tee


def test_bearer_keys():
    keys = ApiKeys(["alpha", "beta"])
    keys.check("Bearer alpha")
    keys.check("bearer beta")
    for header in (None, "", "Bearer", "Bearer gamma", "Basic alpha", "alpha"):
        with pytest.raises(Unauthorized) as info:
            keys.check(header)
        assert info.value.status_code == 401
        assert "alpha" not in info.value.message and "beta" not in info.value.message


def test_keys_come_from_the_environment(monkeypatch):
    assert ApiKeys.from_env(None) is None
    monkeypatch.setenv("MY_KEYS", " k1 , k2 ,")
    ApiKeys.from_env("MY_KEYS").check("Bearer k2")
    monkeypatch.setenv("MY_KEYS", "")
    with pytest.raises(RuntimeError, match="'MY_KEYS' but that environment variable holds no"):
        ApiKeys.from_env("MY_KEYS")


def test_tdx_detection(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_tile\n")
    assert detect_tee(tmp_path / "no-device", cpuinfo) is None
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu tdx_guest avx512f\n")
    assert detect_tee(tmp_path / "no-device", cpuinfo) == "tdx"
    device = tmp_path / "tdx_guest"
    device.write_text("")
    assert detect_tee(device, tmp_path / "missing") == "tdx"
    assert detect_tee(tmp_path / "no-device", tmp_path / "missing") is None


def test_require_tee_refuses_outside_a_guest():
    with pytest.raises(TeeRequiredError, match="refusing to start"):
        check_tee(True, "serve_app.testing:tee_absent")
    assert check_tee(True, "serve_app.testing:tee_present") == "tdx"
    assert check_tee(False, "serve_app.testing:tee_absent") is None
