"""model.backend openvino: the config, the backend choice, and the rule `auto` follows."""

from __future__ import annotations

import types

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.model.backend import OPENVINO_MEASURED_FASTER, select_backend


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


NO_IPEX = ("intel_extension_for_pytorch not usable: ImportError: No module named "
           "'intel_extension_for_pytorch'")


@pytest.mark.parametrize("cpu_class, evidence", sorted(OPENVINO_MEASURED_FASTER.items()))
def test_auto_picks_openvino_on_the_classes_where_it_measured_fastest(cpu_class, evidence):
    choice = select_backend("auto", "2.13.0+cpu", cpu_class=cpu_class, import_ipex=no_ipex,
                            import_openvino=fake_openvino)
    assert (choice.name, choice.reason) == (
        "openvino", f"auto: OpenVINO 2026.4.1 measured fastest on {cpu_class} CPUs "
                    f"({evidence})")


def test_the_measured_classes_are_the_two_development_host_classes():
    assert set(OPENVINO_MEASURED_FASTER) == {"avx2", "avx512_bf16"}


@pytest.mark.parametrize("cpu_class", ["baseline", "avx512", "amx"])
def test_auto_keeps_torch_where_openvino_was_never_measured(cpu_class):
    choice = select_backend("auto", "2.13.0+cpu", cpu_class=cpu_class, import_ipex=no_ipex,
                            import_openvino=fake_openvino)
    assert (choice.name, choice.reason) == (
        "torch", f"auto: OpenVINO not measured on {cpu_class} CPUs; {NO_IPEX}")


def test_auto_without_openvino_installed_keeps_torch():
    choice = select_backend("auto", "2.13.0+cpu", cpu_class="avx2", import_ipex=no_ipex,
                            import_openvino=no_openvino)
    assert (choice.name, choice.reason) == (
        "torch", f"auto: openvino not installed (ImportError); {NO_IPEX}")


def test_auto_prefers_a_matching_ipex_that_someone_installed_on_purpose():
    ipex = types.SimpleNamespace(__version__="2.8.0+cpu")
    choice = select_backend("auto", "2.8.0+cpu", cpu_class="avx512_bf16",
                            import_ipex=lambda: ipex, import_openvino=fake_openvino)
    assert (choice.name, choice.reason) == ("ipex", "IPEX 2.8.0+cpu matches torch 2.8.0+cpu")


def test_auto_on_a_gpu_replica_is_torch_whatever_the_cpu():
    choice = select_backend("auto", "2.13.0", device="cuda", cpu_class="avx2",
                            import_ipex=no_ipex, import_openvino=fake_openvino)
    assert (choice.name, choice.reason) == ("torch", "device cuda")


def test_torch_configured_is_torch_on_every_class():
    choice = select_backend("torch", "2.13.0+cpu", cpu_class="avx2",
                            import_ipex=no_ipex, import_openvino=fake_openvino)
    assert (choice.name, choice.reason) == ("torch", "configured")


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

    # Dynamic quantization off unless asked for (explicitly: the CPU plugin's own default
    # group applies otherwise); no compiled-model cache unless given.
    assert compile_properties(14, "bfloat16") == {
        "INFERENCE_NUM_THREADS": 14, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "bf16", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    assert compile_properties(2, "float32")["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_properties(2, "float32", dynamic_quantization_group=256,
                              cache_dir="/ir/compiled/avx2") == {
        "INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 256,
        "CACHE_DIR": "/ir/compiled/avx2"}
    assert [precision_name(h) for h in ("f32", "bf16", "f16")] == [
        "float32", "bfloat16", "float16"]
