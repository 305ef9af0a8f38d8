"""model.profile and its parts (model.vae, model.openvino.weights, model.torch_int8), the tiny
VAE's source and
IR entry, dynamic activation quantization per CPU class, and the compiled-model cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import (
    EMBEDDED_TINY_VAE,
    FAST_TORCH_INT8_MEASURED,
    FAST_WEIGHTS_MEASURED,
    TAESDXL,
    AppConfig,
)
from serve_app.model.openvino.cache import (
    MARKER,
    TINY_VAE_NETWORKS,
    ExportSpec,
    entry_name,
    is_complete,
    key_material,
)
from serve_app.model.openvino.export import ensure_ir, ir_weights
from serve_app.model.openvino.runtime import (
    DYNAMIC_QUANTIZATION_MEASURED,
    compiled_cache_dir,
    dynamic_quantization_group,
)
from serve_app.model.source import ModelNotFoundError
from serve_app.model.tiny_vae import check_local_tiny_vae

VERSIONS = {"openvino": "2026.4.1", "torch": "2.13.0+cpu", "diffusers": "0.42.1",
            "transformers": "5.23.0", "sdxl-turbo-serve": "0.1.0"}


def model(**fields):
    return AppConfig.model_validate({"model": fields}).model


def test_quality_is_the_default_profile_full_vae_and_the_dtypes_weights():
    m = model()
    assert (m.profile, m.vae, m.openvino.weights) == ("quality", None, None)
    for cpu_class in ("avx2", "avx512_bf16", "amx", None):
        assert (m.resolved_vae, m.resolve_weights(cpu_class)) == (
            "full", ("dtype", "profile quality"))
        assert ir_weights(m, cpu_class) is None


def test_fast_profile_is_int8_weights_where_measured_faster_and_the_tiny_vae():
    """On Zen 4 (avx512_bf16) int8 weights with dynamic quantization beat the bf16 IR; on
    AVX2 (no VNNI) they were slower than float32's: fast keeps the dtype's weights there."""
    fast = model(profile="fast")
    int8_evidence = FAST_WEIGHTS_MEASURED["avx512_bf16"][1]
    assert FAST_WEIGHTS_MEASURED["avx512_bf16"][0] == "int8"
    assert (fast.resolved_vae, fast.resolve_weights("avx512_bf16"),
            ir_weights(fast, "avx512_bf16")) == (
        "tiny", ("int8", f"profile fast: int8 weights measured faster on avx512_bf16 CPUs "
                         f"({int8_evidence})"), "int8")
    weights, avx2_evidence = FAST_WEIGHTS_MEASURED["avx2"]
    assert weights == "dtype"
    assert fast.resolve_weights("avx2") == (
        "dtype", f"profile fast: the dtype's weights measured faster on avx2 CPUs "
                 f"({avx2_evidence})")
    assert ir_weights(fast, "avx2") is None
    # Not measured: the dtype's weights, until a measurement says otherwise.
    for unmeasured in ("amx", "avx512", "baseline"):
        assert unmeasured not in FAST_WEIGHTS_MEASURED
        assert fast.resolve_weights(unmeasured) == (
            "dtype", f"profile fast: int8 weights not measured faster on {unmeasured} CPUs")
        assert ir_weights(fast, unmeasured) is None
    # No replica's CPU to ask (manifests, memory plans): the dtype's, the larger pick.
    assert fast.resolve_weights(None) == (
        "dtype", "profile fast: picked by the replica's CPU class, none known here")


def test_each_part_of_the_fast_profile_is_still_settable_alone():
    full_vae = model(profile="fast", vae="full")
    assert (full_vae.resolved_vae, full_vae.resolve_weights("avx512_bf16")[0]) == (
        "full", "int8")
    # Set weights win over the class's pick, both ways.
    dtype_weights = model(profile="fast", openvino={"weights": "dtype"})
    int8_weights = model(profile="fast", openvino={"weights": "int8"})
    for cpu_class in ("avx2", "avx512_bf16", "amx", None):
        assert (dtype_weights.resolved_vae, dtype_weights.resolve_weights(cpu_class)) == (
            "tiny", ("dtype", "configured (model.openvino.weights)"))
        assert ir_weights(dtype_weights, cpu_class) is None
        assert int8_weights.resolve_weights(cpu_class) == (
            "int8", "configured (model.openvino.weights)")
        assert ir_weights(int8_weights, cpu_class) == "int8"
    quality_tiny = model(vae="tiny")
    assert (quality_tiny.resolved_vae, quality_tiny.resolve_weights("avx512_bf16")[0]) == (
        "tiny", "dtype")


def test_torch_int8_is_off_for_quality_and_on_for_fast_where_measured_faster():
    """The torch backends' int8 UNet layers: never under profile quality; under fast on the
    classes where they measured faster (avx2), with the evidence; set values win."""
    for cpu_class in ("avx2", "avx512_bf16", "amx", None):
        assert model().resolve_torch_int8(cpu_class) == (False, "profile quality")
    fast = model(profile="fast")
    assert list(FAST_TORCH_INT8_MEASURED) == ["avx2"]
    assert fast.resolve_torch_int8("avx2") == (
        True, f"profile fast: int8 layers measured faster on avx2 CPUs "
              f"({FAST_TORCH_INT8_MEASURED['avx2']})")
    for unmeasured in ("avx512_bf16", "amx", "avx512", "baseline"):
        assert fast.resolve_torch_int8(unmeasured) == (
            False, f"profile fast: int8 layers not measured faster on {unmeasured} CPUs")
    assert fast.resolve_torch_int8(None) == (
        False, "profile fast: picked by the replica's CPU class, none known here")
    for cpu_class in ("avx2", "amx", None):
        assert model(torch_int8="dynamic").resolve_torch_int8(cpu_class) == (
            True, "configured (model.torch_int8)")
        assert model(profile="fast", torch_int8="off").resolve_torch_int8(cpu_class) == (
            False, "configured (model.torch_int8)")
    with pytest.raises(ValidationError, match="torch_int8"):
        model(torch_int8="static")


def test_a_further_model_inherits_or_overrides_torch_int8():
    config = AppConfig.model_validate({
        "model": {"torch_int8": "dynamic"},
        "models": [{"id": "b", "source": "embedded:tiny-sdxl-b"},
                   {"id": "c", "source": "embedded:tiny-sdxl-b", "torch_int8": "off"}]})
    models = config.resolved_models()
    assert [models[i].torch_int8 for i in ("sdxl-turbo", "b", "c")] == [
        "dynamic", "dynamic", "off"]


def test_the_tiny_vae_source_defaults_by_the_main_model():
    assert model(vae="tiny").resolved_tiny_vae_source == EMBEDDED_TINY_VAE
    assert model(source="/models/sdxl-turbo").resolved_tiny_vae_source == TAESDXL == (
        "madebyollin/taesdxl")
    assert model(tiny_vae_source="/models/taesdxl").resolved_tiny_vae_source == (
        "/models/taesdxl")


def test_unknown_profiles_and_vaes_are_refused():
    with pytest.raises(ValidationError) as info:
        model(profile="turbo")
    assert info.value.errors()[0]["loc"] == ("model", "profile")
    with pytest.raises(ValidationError) as info:
        model(vae="small")
    assert info.value.errors()[0]["loc"] == ("model", "vae")
    with pytest.raises(ValidationError) as info:
        model(openvino={"dynamic_quantization_group_size": -1})
    assert info.value.errors()[0]["loc"] == ("model", "openvino",
                                             "dynamic_quantization_group_size")


def test_the_old_tiny_vae_lever_fails_with_where_it_went():
    with pytest.raises(ValidationError) as info:
        model(optimization={"tiny_vae": "/models/taesdxl"})
    assert "model.optimization.tiny_vae was replaced by model.vae: tiny (and " \
           "model.tiny_vae_source: <that directory>)" in str(info.value)


def test_a_tiny_vae_directory_without_a_config_fails_at_start(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model.tiny_vae_source .*: no "
                                                 "AutoencoderTiny there"):
        check_local_tiny_vae(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert check_local_tiny_vae(str(tmp_path)) is None
    assert check_local_tiny_vae(EMBEDDED_TINY_VAE) is None
    assert check_local_tiny_vae(TAESDXL) is None  # a hub id is resolved in the replica


def test_dynamic_quantization_only_on_int8_weights_and_by_cpu_class():
    assert dynamic_quantization_group(None, None, "avx512_bf16") == (
        0, "off: the IR has no int8 weights")
    assert dynamic_quantization_group(512, None, "avx2") == (
        0, "off: the IR has no int8 weights")
    assert dynamic_quantization_group(512, "int8", "avx2") == (512, "configured")
    assert dynamic_quantization_group(0, "int8", "avx512_bf16") == (0, "off: configured 0")
    group, evidence = DYNAMIC_QUANTIZATION_MEASURED["avx512_bf16"]
    assert group == 256
    assert dynamic_quantization_group(None, "int8", "avx512_bf16") == (
        256, f"measured on avx512_bf16 CPUs: {evidence}")
    for unmeasured in ("avx2", "avx512", "amx"):
        assert unmeasured not in DYNAMIC_QUANTIZATION_MEASURED
        assert dynamic_quantization_group(None, "int8", unmeasured) == (
            0, f"off: not measured faster on {unmeasured} CPUs")


def test_the_compiled_cache_sits_beside_the_ir_per_cpu_class(tmp_path):
    assert compiled_cache_dir(None, tmp_path / "ir", "avx2") == (
        str(tmp_path / "ir" / "compiled" / "avx2"), None)
    assert (tmp_path / "ir" / "compiled" / "avx2").is_dir()
    assert compiled_cache_dir(str(tmp_path / "elsewhere"), tmp_path / "ir", "amx") == (
        str(tmp_path / "elsewhere" / "amx"), None)
    assert compiled_cache_dir("", tmp_path / "ir", "avx2") == (
        None, "off: model.openvino.compiled_cache_dir is empty")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_an_unwritable_compiled_cache_is_skipped_with_the_reason(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        where, why = compiled_cache_dir(str(read_only), tmp_path, "avx2")
    finally:
        read_only.chmod(0o755)
    assert where is None
    assert why.startswith(f"{read_only / 'avx2'} is not writable (")
    assert why.endswith("): every start compiles")


def tiny_vae_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    (root / "diffusion_pytorch_model.safetensors").write_bytes(b"t" * 32)
    return root


def test_the_tiny_vae_has_an_ir_entry_of_its_own_keyed_by_its_files(tmp_path):
    vae = tiny_vae_dir(tmp_path / "taesd")
    spec = ExportSpec(source=str(vae), model_dir=str(vae), dtype="float32",
                      component="tiny_vae")
    assert spec.networks == TINY_VAE_NETWORKS == ("tiny_vae_decoder", "tiny_vae_encoder")
    material = key_material(spec, package_versions=VERSIONS)
    assert material["options"] == {"dtype": "float32", "weights": "dtype",
                                   "component": "tiny_vae"}
    assert set(material["model"]["files"]) == {"config.json",
                                               "diffusion_pytorch_model.safetensors"}
    name = entry_name(material)
    assert name.startswith("tiny_vae-float32-") and len(name) == len("tiny_vae-float32-") + 16
    (vae / "config.json").write_text('{"_class_name": "AutoencoderTiny", "x": 1}')
    assert entry_name(key_material(spec, package_versions=VERSIONS)) != name
    with pytest.raises(ValueError, match="component must be one of"):
        ExportSpec(source="s", model_dir="d", dtype="float32", component="vae")


def test_ensure_ir_exports_the_tiny_vae_once_into_the_given_root(tmp_path):
    vae = tiny_vae_dir(tmp_path / "taesd")
    root = tmp_path / "ir"
    spec = ExportSpec(source=str(vae), model_dir=str(vae), dtype="float32",
                      component="tiny_vae")
    calls: list[Path] = []

    def export(one: ExportSpec, target: Path) -> None:
        calls.append(target)
        target.mkdir(parents=True)
        for name in one.networks:
            (target / f"{name}.xml").write_text("<net/>")
            (target / f"{name}.bin").write_bytes(b"\0")
        (target / MARKER).write_text(json.dumps({"pid": os.getpid()}))

    entry, exported = ensure_ir(spec, None, export=export, root=root)
    assert (entry.parent, exported, calls) == (root, True, [entry])
    assert is_complete(entry, TINY_VAE_NETWORKS) and not is_complete(entry)
    assert ensure_ir(spec, None, export=export, root=root) == (entry, False)
    assert len(calls) == 1
    assert not (vae / "openvino").exists()  # nothing written beside the tiny VAE's files


def test_the_int8_cache_sits_in_the_models_directory_unless_configured(tmp_path):
    from serve_app.model.optimize.int8_cache import cache_root

    assert cache_root(tmp_path / "model", None) == tmp_path / "model" / "torch-int8"
    assert cache_root(tmp_path / "model", str(tmp_path / "shared")) == tmp_path / "shared"
    assert cache_root(tmp_path / "model", "") is None
    assert model(torch_int8_cache_dir="").torch_int8_cache_dir == ""
