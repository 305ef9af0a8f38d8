"""model.backend openvino: the config, the backend choice, and the candidate rule for auto."""

from __future__ import annotations

import types

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.model.backend import (
    OPENVINO_CANDIDATE_CLASSES,
    BackendChoice,
    auto_rule_candidate,
    select_backend,
)


def fake_openvino():
    return types.SimpleNamespace(__version__="2026.4.1-22982-e213a147257-releases/2026/4")


def no_openvino():
    raise ImportError("No module named 'openvino'")


def no_ipex():
    raise ImportError("No module named 'intel_extension_for_pytorch'")


def test_config_takes_the_openvino_backend_and_its_options():
    config = AppConfig.model_validate({"model": {"backend": "openvino", "openvino": {
        "cache_dir": "/shared/ir", "weights": "int8"}}})
    assert config.model.backend == "openvino"
    assert config.model.openvino.cache_dir == "/shared/ir"
    assert config.model.openvino.weights == "int8"
    defaults = AppConfig().model.openvino
    assert (defaults.cache_dir, defaults.weights) == (None, None)
    assert AppConfig().model.backend == "auto"


def test_config_rejects_other_weight_formats_and_unknown_keys():
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate({"model": {"openvino": {"weights": "int4"}}})
    assert info.value.errors()[0]["loc"] == ("model", "openvino", "weights")
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate({"model": {"openvino": {"cache": "/x"}}})
    assert info.value.errors()[0]["loc"] == ("model", "openvino", "cache")


def test_openvino_is_chosen_when_configured_and_importable():
    choice = select_backend("openvino", "2.13.0+cpu", import_openvino=fake_openvino)
    assert (choice.name, choice.reason) == ("openvino", "configured; OpenVINO 2026.4.1")


def test_openvino_that_cannot_import_fails_with_the_reason():
    with pytest.raises(RuntimeError) as info:
        select_backend("openvino", "2.13.0+cpu", import_openvino=no_openvino)
    assert str(info.value) == ("backend 'openvino' requested but openvino is not usable: "
                               "ImportError: No module named 'openvino' "
                               "(pip install -e '.[openvino]')")


def test_openvino_on_a_gpu_replica_is_an_error():
    with pytest.raises(RuntimeError, match="backend 'openvino' is for CPU replicas"):
        select_backend("openvino", "2.13.0", device="cuda", import_openvino=fake_openvino)


def test_auto_never_picks_openvino_today():
    choice = select_backend("auto", "2.13.0+cpu", import_ipex=no_ipex,
                            import_openvino=fake_openvino)
    assert choice.name == "torch"


IPEX = BackendChoice("ipex", "IPEX 2.8.0 matches torch 2.8.0")
TORCH = BackendChoice("torch", "intel_extension_for_pytorch not usable")


@pytest.mark.parametrize("cpu_class, ipex, version, cached, expected", [
    ("amx", IPEX, "2026.4.1", True, ("ipex", "IPEX 2.8.0 matches torch 2.8.0")),
    ("amx", TORCH, "2026.4.1", True,
     ("openvino", "candidate: OpenVINO 2026.4.1 on CPU amx with the IR cached")),
    ("amx", TORCH, "2026.4.1", False,
     ("torch", "candidate: no OpenVINO IR cached for this model (run sdxl-turbo-export)")),
    ("amx", TORCH, None, True, ("torch", "candidate: openvino not installed")),
    ("avx2", TORCH, "2026.4.1", True,
     ("torch", "candidate: CPU avx2 is not one where OpenVINO measured faster (amx)")),
    ("avx512_bf16", TORCH, "2026.4.1", True,
     ("torch", "candidate: CPU avx512_bf16 is not one where OpenVINO measured faster (amx)")),
])
def test_the_auto_rule_candidate(cpu_class, ipex, version, cached, expected):
    assert OPENVINO_CANDIDATE_CLASSES == frozenset({"amx"})
    choice = auto_rule_candidate(cpu_class, ipex=ipex, openvino_version=version,
                                 ir_cached=cached)
    assert (choice.name, choice.reason) == expected


def test_sizes_the_ir_cannot_run_fail_the_start():
    from serve_app.model.openvino.runtime import check_sizes

    sdxl = {"block_out_channels": [320, 640, 1280]}  # two up-samplers: 32-pixel multiples
    check_sizes(["512x512", "1024x1024", "768x1344"], sdxl)
    with pytest.raises(ValueError) as info:
        check_sizes(["512x512", "520x520", "512x528"], sdxl)
    assert str(info.value) == ("backend openvino: sizes ['520x520', '512x528'] are not "
                               "multiples of 32 pixels, which this model's OpenVINO IR needs")
    tiny = {"block_out_channels": [32, 64]}  # one up-sampler: 16-pixel multiples
    check_sizes(["144x144"], tiny)
    with pytest.raises(ValueError, match=r"sizes \['136x136'\] are not multiples of 16"):
        check_sizes(["136x136"], tiny)


def test_compile_properties_follow_threads_and_dtype():
    from serve_app.model.openvino.runtime import compile_properties, precision_name

    assert compile_properties(14, "bfloat16") == {
        "INFERENCE_NUM_THREADS": 14, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "bf16"}
    assert compile_properties(2, "float32")["INFERENCE_PRECISION_HINT"] == "f32"
    assert [precision_name(h) for h in ("f32", "bf16", "f16")] == [
        "float32", "bfloat16", "float16"]
