"""The OpenVINO IR cache: its key, its directory, who exports and when (no openvino needed:
the exporter is replaced by a fake that writes the files an export writes)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from serve_app.model.openvino import cache
from serve_app.model.openvino.cache import (
    MARKER,
    NETWORKS,
    CacheNotWritableError,
    ExportSpec,
    cache_root,
    entry_name,
    is_complete,
    key_material,
    model_fingerprint,
    require_writable,
)
from serve_app.model.openvino.export import _serve_args, ensure_ir, main

VERSIONS = {"openvino": "2026.4.1", "torch": "2.13.0+cpu", "diffusers": "0.42.1",
            "transformers": "5.23.0", "sdxl-turbo-serve": "0.1.0"}


def fake_model(root: Path) -> Path:
    """A diffusers directory's shape: model_index.json, configs, weights, tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (root / part).mkdir()
        (root / part / "config.json").write_text(json.dumps({"part": part}))
        (root / part / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 64)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"steps_offset": 1}')
    return root


def spec_for(model_dir: Path, dtype: str = "float32", weights: str | None = None) -> ExportSpec:
    return ExportSpec(source=str(model_dir), model_dir=str(model_dir), dtype=dtype,
                      weights=weights)


def name_of(spec: ExportSpec, versions: dict[str, str] = VERSIONS) -> str:
    return entry_name(key_material(spec, package_versions=versions))


class FakeExporter:
    """Writes what export_ir writes, counting calls (optionally slowly)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[Path] = []
        self.delay_s = delay_s

    def __call__(self, spec: ExportSpec, target: Path) -> None:
        self.calls.append(target)
        time.sleep(self.delay_s)
        target.mkdir(parents=True)
        for name in NETWORKS:
            (target / f"{name}.xml").write_text("<net/>")
            (target / f"{name}.bin").write_bytes(b"\0")
        (target / "configs.json").write_text("{}")
        (target / MARKER).write_text(json.dumps({"pid": os.getpid()}))


def test_key_material_holds_model_versions_and_options(tmp_path):
    model = fake_model(tmp_path / "m")
    spec = ExportSpec(source="stabilityai/sdxl-turbo", model_dir=str(model), dtype="bfloat16",
                      revision="abc", weights="int8")
    material = key_material(spec, package_versions=VERSIONS)
    assert material["format"] == cache.EXPORT_FORMAT == 2  # 2: the VAE encoder joined
    assert material["model"]["source"] == "stabilityai/sdxl-turbo"
    assert material["model"]["revision"] == "abc"
    assert material["versions"] == VERSIONS
    assert material["options"] == {"dtype": "bfloat16", "weights": "int8"}
    files = material["model"]["files"]
    assert sorted(files) == [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/diffusion_pytorch_model.safetensors", "text_encoder_2/config.json",
        "text_encoder_2/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors"]
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert files["unet/diffusion_pytorch_model.safetensors"] == [64, weights.stat().st_mtime_ns]
    # Small text files by content.
    assert len(files["unet/config.json"]) == 64


def test_the_versions_read_are_the_installed_ones_and_nncf_only_for_int8():
    assert list(cache.versions(None)) == ["openvino", "torch", "diffusers", "transformers",
                                          "sdxl-turbo-serve"]
    assert list(cache.versions("int8"))[-1] == "nncf"
    import diffusers
    import torch

    assert cache.versions(None)["torch"] == torch.__version__
    assert cache.versions(None)["diffusers"] == diffusers.__version__
    assert cache.package_version("no-such-package-here") == "not installed"


def test_entry_name_is_stable_and_readable(tmp_path):
    model = fake_model(tmp_path / "m")
    first, second = name_of(spec_for(model)), name_of(spec_for(model))
    assert first == second
    prefix, digest = first.rsplit("-", 1)
    assert prefix == "float32-dtype"
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert name_of(spec_for(model, "bfloat16", "int8")).startswith("bfloat16-int8-")


@pytest.mark.parametrize("change", ["dtype", "weights", "openvino", "torch", "diffusers",
                                    "project", "source", "weight file", "config file"])
def test_every_input_of_the_key_changes_the_entry(tmp_path, change):
    model = fake_model(tmp_path / "m")
    before = name_of(spec_for(model))
    spec, versions = spec_for(model), dict(VERSIONS)
    if change == "dtype":
        spec = spec_for(model, "bfloat16")
    elif change == "weights":
        spec = spec_for(model, weights="int8")
    elif change in ("openvino", "torch", "diffusers"):
        versions[change] += ".post1"
    elif change == "project":
        versions["sdxl-turbo-serve"] = "0.2.0"
    elif change == "source":
        spec = ExportSpec(source="other/model", model_dir=str(model), dtype="float32")
    elif change == "weight file":
        (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 65)
    elif change == "config file":
        (model / "vae" / "config.json").write_text('{"part": "vae2"}')
    assert name_of(spec, versions) != before


def test_the_cache_inside_the_model_dir_and_other_files_do_not_change_the_key(tmp_path):
    model = fake_model(tmp_path / "m")
    before = model_fingerprint(model)
    FakeExporter()(spec_for(model), model / "openvino" / "float32-dtype-0")
    (model / "README.md").write_text("notes")
    assert model_fingerprint(model) == before


def test_cache_root_is_beside_the_weights_unless_configured(tmp_path):
    assert cache_root(tmp_path / "m", None) == tmp_path / "m" / "openvino"
    assert cache_root(tmp_path / "m", str(tmp_path / "ir")) == tmp_path / "ir"
    assert cache_root("/models/x", "~/ir") == Path.home() / "ir"


def test_export_spec_accepts_resolved_dtypes_only(tmp_path):
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16, got 'auto'"):
        ExportSpec(source="s", model_dir="d", dtype="auto")
    with pytest.raises(ValueError, match="weights must be int8 or unset, got 'int4'"):
        ExportSpec(source="s", model_dir="d", dtype="float32", weights="int4")
    spec = ExportSpec(source="s", model_dir="d", dtype="bfloat16", revision="r",
                      weights="int8")
    assert ExportSpec.from_json(spec.to_json()) == spec


def test_an_entry_is_complete_only_with_every_network_and_the_marker(tmp_path):
    entry = tmp_path / "e"
    FakeExporter()(spec_for(tmp_path), entry)
    assert is_complete(entry)
    (entry / MARKER).unlink()
    assert not is_complete(entry)
    FakeExporter()(spec_for(tmp_path), tmp_path / "f")
    (tmp_path / "f" / "unet.bin").unlink()
    assert not is_complete(tmp_path / "f")


def test_first_start_exports_once_and_the_second_reuses_it(tmp_path):
    model = fake_model(tmp_path / "m")
    exporter = FakeExporter()
    entry, exported = ensure_ir(spec_for(model), None, export=exporter)
    assert exported is True
    assert exporter.calls == [entry]
    assert entry.parent == model / "openvino"
    assert entry.name == entry_name(key_material(spec_for(model)))
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    again, exported = ensure_ir(spec_for(model), None, export=exporter)
    assert (again, exported) == (entry, False)
    assert len(exporter.calls) == 1
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    # Another dtype is another entry, exported on its own.
    other, exported = ensure_ir(spec_for(model, "bfloat16"), None, export=exporter)
    assert exported is True and other != entry and len(exporter.calls) == 2


def test_replicas_starting_together_export_once(tmp_path):
    model = fake_model(tmp_path / "m")
    exporter = FakeExporter(delay_s=0.5)
    results: list[tuple[Path, bool]] = []

    def start() -> None:
        results.append(ensure_ir(spec_for(model), str(tmp_path / "ir"), export=exporter))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(exporter.calls) == 1
    assert sorted(exported for _, exported in results) == [False, False, True]
    assert len({entry for entry, _ in results}) == 1


def test_an_unwritable_cache_without_the_ir_is_one_clear_line(tmp_path):
    model = fake_model(tmp_path / "m")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    root = blocker / "ir"  # cannot be created: its parent is a file
    exporter = FakeExporter()
    with pytest.raises(CacheNotWritableError) as info:
        ensure_ir(spec_for(model), str(root), export=exporter)
    name = entry_name(key_material(spec_for(model)))
    assert str(info.value) == (
        f"OpenVINO IR cache {root} is not writable (Not a directory) and has no IR {name} "
        f"for this model, versions and options: run `sdxl-turbo-export` with the same config "
        f"where it is writable, or set model.openvino.cache_dir to a writable directory "
        f"every replica shares")
    assert "\n" not in str(info.value)
    assert exporter.calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; the "
                    "not-a-directory case above covers the error for root")
def test_a_read_only_directory_is_not_writable(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(CacheNotWritableError, match=r"is not writable \(Permission denied\)"):
            require_writable(root, "float32-dtype-0")
    finally:
        root.chmod(0o755)


def test_a_read_only_cache_that_has_the_ir_is_used_without_writing(tmp_path, monkeypatch):
    model = fake_model(tmp_path / "m")
    entry, _ = ensure_ir(spec_for(model), str(tmp_path / "ir"), export=FakeExporter())

    def no_write(*args):
        raise AssertionError("a cached IR needs no writable cache")

    monkeypatch.setattr("serve_app.model.openvino.export.require_writable", no_write)
    monkeypatch.setattr("serve_app.model.openvino.export.export_lock", no_write)
    exporter = FakeExporter()
    assert ensure_ir(spec_for(model), str(tmp_path / "ir"), export=exporter) == (entry, False)
    assert exporter.calls == []


def test_require_writable_creates_the_directory_and_leaves_nothing(tmp_path):
    root = tmp_path / "a" / "b"
    require_writable(root, "x")
    assert root.is_dir() and list(root.iterdir()) == []


def test_serve_config_args_by_application(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n"
                      "  - {name: a, args: {model: {source: /m/a}}}\n"
                      "  - {name: b, args: {model: {source: /m/b}}}\n")
    assert _serve_args(str(config), "b") == {"model": {"source": "/m/b"}}
    with pytest.raises(SystemExit, match=r"pick one application with --app \(have \['a', 'b'\]\)"):
        _serve_args(str(config), None)
    plain = tmp_path / "args.yaml"
    plain.write_text("model: {source: /m/c}\n")
    assert _serve_args(str(plain), None) == {"model": {"source": "/m/c"}}


def test_cli_with_an_unwritable_cache_prints_one_line_and_fails(tmp_path, capsys):
    model = fake_model(tmp_path / "m")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["--source", str(model), "--dtype", "float32", "--cache-dir",
                 str(blocker / "ir")])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith(f"sdxl-turbo-export: OpenVINO IR cache {blocker / 'ir'} is not "
                          f"writable (Not a directory) and has no IR float32-dtype-")
    assert err.count("\n") == 1


def test_staging_left_by_a_dead_export_is_removed_under_the_lock(tmp_path):
    model = fake_model(tmp_path / "m")
    root = tmp_path / "ir"
    name = entry_name(key_material(spec_for(model)))
    dead = root / f".staging-{name}-k1ll3d"
    other = root / ".staging-bfloat16-dtype-0123456789abcdef-x"
    for path in (dead, other):
        path.mkdir(parents=True)
        (path / "unet.bin").write_bytes(b"\0" * 16)
    exporter = FakeExporter()
    entry, exported = ensure_ir(spec_for(model), str(root), export=exporter)
    assert exported is True
    assert not dead.exists()
    assert other.exists()  # another entry's export may still be writing it


def test_without_file_locks_exports_still_run_and_no_staging_is_touched(
        tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    model = fake_model(tmp_path / "m")
    root = tmp_path / "ir"
    name = entry_name(key_material(spec_for(model)))
    busy = root / f".staging-{name}-other-replica"
    busy.mkdir(parents=True)
    exporter = FakeExporter()
    with caplog.at_level("WARNING", logger="serve_app.model.openvino.cache"):
        entry, exported = ensure_ir(spec_for(model), str(root), export=exporter)
    assert exported is True and exporter.calls == [entry]
    assert busy.exists()
    assert (f"no lock on {root / f'.{name}.lock'} (No locks available): replicas starting "
            f"together may each export") in caplog.text
