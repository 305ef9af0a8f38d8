"""Export the pipeline's networks to OpenVINO IR: `sdxl-turbo-export`, and the subprocess a
replica runs when the cache has no IR for its key.

Memory is bounded by exporting one network at a time: each is loaded from the model's
directory on its own, converted (`openvino.convert_model` traces it with a small example
input; batch, latent height/width and the prompt's length stay dynamic), optionally
compressed to int8 weights (`nncf.compress_weights`), saved, and freed before the next one.
A replica runs this in a child process, so whatever the conversion allocated is returned to
the system when the child exits; the replica itself never holds the torch weights.

The IR keeps the dtype's weights: f32 for float32; for bfloat16 the weights are stored as
f16 (`compress_to_fp16`, half the disk; the CPU plugin converts them to its inference
precision, bf16 there, at compile time). One exception: for float32, a UNet stored in one
16-bit type keeps its linear weights in that type (the same values; the plugin computes in
f32), since its float32 export does not fit a 24 GB host at full size.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app.model.openvino.cache import (
    MARKER,
    ExportSpec,
    cache_root,
    entry_name,
    export_lock,
    is_complete,
    key_material,
    remove_stale_staging,
    require_writable,
    staging_prefix,
)

logger = logging.getLogger(__name__)

Exporter = Callable[[ExportSpec, Path], None]


def _example_latent_side(up_blocks: int) -> int:
    """A latent side the UNet's up-sampling path divides evenly (it traces that branch)."""
    factor = 2 ** max(up_blocks - 1, 0)
    return max(16, factor)


def _convert_text_encoder(model_dir: str, name: str) -> tuple[Any, dict[str, Any]]:
    import openvino as ov
    import torch
    import transformers

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    cls = getattr(transformers, index[name][1])
    encoder = cls.from_pretrained(model_dir, subfolder=name, dtype=torch.float32).eval()

    class TextEncoder(torch.nn.Module):
        """input_ids -> (output 0, hidden_states[-2], hidden_states[-1]): what
        StableDiffusionXLPipeline.encode_prompt reads (output 0 is the pooled projection
        for CLIPTextModelWithProjection)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor):
            out = self.inner(input_ids, output_hidden_states=True)
            return out[0], out.hidden_states[-2], out.hidden_states[-1]

    length = int(encoder.config.max_position_embeddings)
    config = {"projection_dim": getattr(encoder.config, "projection_dim", None),
              "hidden_size": encoder.config.hidden_size}
    with torch.no_grad():
        model = ov.convert_model(TextEncoder(encoder),
                                 example_input=(torch.ones(1, length, dtype=torch.long),),
                                 input=[([-1, -1], ov.Type.i64)])
    return model, config


SAFETENSORS_16BIT = {"BF16": "bfloat16", "F16": "float16"}


def stored_16bit_dtype(model_dir: str, subfolder: str) -> str | None:
    """'bfloat16' or 'float16' when every floating-point tensor in the component's
    safetensors files is stored in that one 16-bit type, else None. Reads the files'
    headers only (8 bytes of length, then JSON)."""
    files = sorted((Path(model_dir) / subfolder).glob("*.safetensors"))
    kinds: set[str] = set()
    for path in files:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        kinds |= {entry["dtype"] for name, entry in header.items()
                  if name != "__metadata__" and entry["dtype"].startswith(("F", "BF"))}
    if len(kinds) == 1 and next(iter(kinds)) in SAFETENSORS_16BIT:
        return SAFETENSORS_16BIT[next(iter(kinds))]
    return None


def _convert_unet(model_dir: str, keep_16bit: bool = False) -> tuple[Any, dict[str, Any]]:
    """keep_16bit: where the UNet's weights are stored in one 16-bit type, load them in it
    and keep its linear layers' weights 16-bit in the IR (OpenVINO's own 16-bit tracing:
    the weights are the same values, decompressed to f32 by the CPU plugin). Loading the
    full-size UNet in float32 and saving f32 weights passed 21.9 GB of RSS on a 24 GB host
    (BENCHMARKS.md); in its stored type it is half the weights to hold."""
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    stored = stored_16bit_dtype(model_dir, "unet") if keep_16bit else None
    unet = UNet2DConditionModel.from_pretrained(
        model_dir, subfolder="unet",
        dtype=getattr(torch, stored) if stored else torch.float32).eval()
    if stored:
        # Linear (and embedding) modules keep their 16-bit weights as graph constants; every
        # other parameter is cast to float32, so activations stay f32.
        from openvino.frontend.pytorch.patch_model import __make_16bit_traceable

        __make_16bit_traceable(unet)
    cfg = unet.config
    if cfg.time_cond_proj_dim is not None:
        raise ValueError("OpenVINO export: UNets with time_cond_proj_dim (LCM guidance "
                         "embedding) are not supported")
    if cfg.addition_embed_type != "text_time":
        raise ValueError(f"OpenVINO export: expected an SDXL UNet (addition_embed_type "
                         f"'text_time'), got {cfg.addition_embed_type!r}")
    add_in = int(unet.add_embedding.linear_1.in_features)
    time_ids = 6
    pooled = add_in - time_ids * int(cfg.addition_time_embed_dim)

    class UNet(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs={"text_embeds": text_embeds,
                                                 "time_ids": time_ids},
                              return_dict=False)[0]

    side = _example_latent_side(len(cfg.block_out_channels))
    channels = int(cfg.in_channels)
    context = int(cfg.cross_attention_dim)
    example = (torch.randn(1, channels, side, side), torch.tensor([999.0]),
               torch.randn(1, 77, context), torch.randn(1, pooled), torch.randn(1, time_ids))
    shapes = [([-1, channels, -1, -1], ov.Type.f32), ([-1], ov.Type.f32),
              ([-1, -1, context], ov.Type.f32), ([-1, pooled], ov.Type.f32),
              ([-1, time_ids], ov.Type.f32)]
    config = dict(cfg)
    config["add_embedding_in_features"] = add_in
    with torch.no_grad():
        model = ov.convert_model(UNet(unet), example_input=example, input=shapes)
    return model, config


def _convert_vae_decoder(model_dir: str) -> tuple[Any, dict[str, Any]]:
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32).eval()

    class Decoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:  # AutoencoderKL (diffusers is untyped here)
            super().__init__()
            self.inner = inner

        def forward(self, latents):
            return self.inner.decode(latents, return_dict=False)[0]

    channels = int(vae.config.latent_channels)
    with torch.no_grad():
        model = ov.convert_model(Decoder(vae), example_input=(torch.randn(1, channels, 16, 16),),
                                 input=[([-1, channels, -1, -1], ov.Type.f32)])
    return model, dict(vae.config)


def _convert_vae_encoder(model_dir: str) -> tuple[Any, dict[str, Any]]:
    """The encoder up to the latent distribution's moments (mean and log-variance): the
    sampling stays in torch, with the request's generator, as diffusers does it."""
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image):
            hidden = self.inner.encoder(image)
            quant_conv = getattr(self.inner, "quant_conv", None)
            return hidden if quant_conv is None else quant_conv(hidden)

    side = 8 * 2 ** (len(vae.config.block_out_channels) - 1)
    channels = int(vae.config.in_channels)
    with torch.no_grad():
        model = ov.convert_model(Encoder(vae),
                                 example_input=(torch.randn(1, channels, side * 2, side * 2),),
                                 input=[([-1, channels, -1, -1], ov.Type.f32)])
    return model, dict(vae.config)


def _load_tiny_vae(model_dir: str) -> Any:
    import torch
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(model_dir, dtype=torch.float32).eval()


def _convert_tiny_vae_decoder(model_dir: str) -> tuple[Any, dict[str, Any]]:
    """AutoencoderTiny.decode: latents -> pixels in [-1, 1] (model_dir: its own directory)."""
    import openvino as ov
    import torch

    vae = _load_tiny_vae(model_dir)
    channels = int(vae.config.latent_channels)
    with torch.no_grad():
        model = ov.convert_model(vae.decoder, example_input=(torch.randn(1, channels, 16, 16),),
                                 input=[([-1, channels, -1, -1], ov.Type.f32)])
    return model, dict(vae.config)


def _convert_tiny_vae_encoder(model_dir: str) -> tuple[Any, dict[str, Any]]:
    """AutoencoderTiny.encode: pixels in [-1, 1] -> latents (deterministic: no sampling)."""
    import openvino as ov
    import torch

    vae = _load_tiny_vae(model_dir)
    channels = int(vae.config.in_channels)
    with torch.no_grad():
        model = ov.convert_model(vae.encoder, example_input=(torch.randn(1, channels, 128, 128),),
                                 input=[([-1, channels, -1, -1], ov.Type.f32)])
    return model, dict(vae.config)


CONVERTERS: dict[str, Callable[[str], tuple[Any, dict[str, Any]]]] = {
    "text_encoder": lambda d: _convert_text_encoder(d, "text_encoder"),
    "text_encoder_2": lambda d: _convert_text_encoder(d, "text_encoder_2"),
    "unet": _convert_unet,
    "vae_decoder": _convert_vae_decoder,
    "vae_encoder": _convert_vae_encoder,
    "tiny_vae_decoder": _convert_tiny_vae_decoder,
    "tiny_vae_encoder": _convert_tiny_vae_encoder,
}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def export_ir(spec: ExportSpec, target: Path, material: dict[str, Any] | None = None) -> None:
    """Export every network into `target` (in this process). Writes a staging directory
    beside it and renames it into place; `export.json` marks it complete."""
    import openvino as ov
    import torch

    material = key_material(spec) if material is None else material
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target.name), dir=target.parent))
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    configs: dict[str, Any] = {}
    try:
        for name in spec.networks:
            stage = time.perf_counter()
            with warnings.catch_warnings():
                # The tracer's "Python boolean" warnings: shape checks and branches taken as
                # constants. The one that matters (the UNet's up-sampling branch on latent
                # sizes) is covered by runtime.check_sizes.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                if name == "unet":
                    # float32 with the dtype's weights: 16-bit stored weights stay 16-bit
                    # (int8 compression and the bfloat16 IR's f16 storage start from f32).
                    model, configs[name] = _convert_unet(
                        spec.model_dir,
                        keep_16bit=spec.dtype == "float32" and spec.weights is None)
                else:
                    model, configs[name] = CONVERTERS[name](spec.model_dir)
            gc.collect()  # the torch module is gone with the converter's frame
            if spec.weights == "int8":
                import nncf

                model = nncf.compress_weights(model)
            ov.save_model(model, staging / f"{name}.xml",
                          compress_to_fp16=spec.dtype == "bfloat16")
            del model
            gc.collect()
            seconds[name] = round(time.perf_counter() - stage, 3)
            logger.info("exported %s in %.1fs (peak RSS %.0f MiB)", name, seconds[name],
                        _peak_rss_mib())
        (staging / "configs.json").write_text(json.dumps(configs, indent=1, default=list))
        (staging / "key.json").write_text(json.dumps(material, indent=1, sort_keys=True))
        (staging / MARKER).write_text(json.dumps({
            "spec": json.loads(spec.to_json()),
            "seconds": dict(seconds, total=round(time.perf_counter() - started, 3)),
            "peak_rss_mib": round(_peak_rss_mib()),
            "pid": os.getpid(),
        }, indent=1))
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target, spec.networks):
                raise
            logger.info("%s was exported meanwhile by another process; keeping that one",
                        target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_in_subprocess(spec: ExportSpec, target: Path) -> None:
    """export_ir in a child Python: its memory is the child's, freed when it exits."""
    # The directory holding serve_app (a namespace package: no serve_app.__file__).
    package_parent = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH"))
                                        if p)
    command = [sys.executable, "-m", "serve_app.model.openvino.export",
               "--spec", spec.to_json(), "--target", str(target)]
    logger.info("OpenVINO IR %s not cached: exporting in a subprocess", target)
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in (proc.stdout + proc.stderr).splitlines():
        logger.info("export: %s", line)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise RuntimeError(f"OpenVINO export of {spec.source} failed (exit code "
                           f"{proc.returncode}): {last}")


def ensure_ir(spec: ExportSpec, configured_root: str | None,
              export: Exporter = export_in_subprocess,
              root: Path | None = None) -> tuple[Path, bool]:
    """The IR directory for `spec`, exporting it first if the cache has none.
    Returns (directory, whether this call exported it). `root`: the cache root to use
    (the tiny VAE's entry lives beside the model's IR, not in the tiny VAE's directory)."""
    root = cache_root(spec.model_dir, configured_root) if root is None else root
    material = key_material(spec)
    entry = root / entry_name(material)
    if is_complete(entry, spec.networks):
        return entry, False
    require_writable(root, entry.name)
    with export_lock(root, entry.name) as locked:
        if is_complete(entry, spec.networks):  # exported by another replica meanwhile
            return entry, False
        if locked:
            remove_stale_staging(root, entry.name)
        export(spec, entry)
    if not is_complete(entry, spec.networks):
        raise RuntimeError(f"OpenVINO export finished but {entry} is incomplete")
    return entry, True


def _serve_args(path: str, app: str | None) -> dict[str, Any]:
    """A Serve config file's application args (by name, or the only one), or a plain args
    file (`model: ...` at the top)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    apps = data.get("applications")
    if apps is None:
        return data
    if app is not None:
        apps = [a for a in apps if a.get("name") == app]
    if len(apps) != 1:
        names = [a.get("name") for a in data["applications"]]
        raise SystemExit(f"{path}: pick one application with --app (have {names})")
    return apps[0].get("args") or {}


def spec_from_config(config: Any, dtype: str, cpu_class: str) -> ExportSpec:
    from serve_app.model.source import resolve_model_dir

    model = config.model
    model_dir = resolve_model_dir(model.source, model.revision, model.cache_dir)
    return ExportSpec(source=model.source, revision=model.revision, model_dir=str(model_dir),
                      dtype=dtype, weights=ir_weights(model, cpu_class))


def ir_weights(model: Any, cpu_class: str | None) -> str | None:
    """model.openvino.weights (or the profile's pick for `cpu_class`, ModelConfig.
    resolve_weights) as ExportSpec.weights: None for the dtype's."""
    return "int8" if model.resolve_weights(cpu_class)[0] == "int8" else None


def tiny_vae_spec(model: Any, dtype: str) -> ExportSpec:
    """The tiny VAE's IR (model.vae tiny), keyed by its own files; dtype weights."""
    from serve_app.model.tiny_vae import resolve_tiny_vae_dir

    vae_dir = resolve_tiny_vae_dir(model.resolved_tiny_vae_source, model.tiny_vae_revision,
                                   model.cache_dir)
    return ExportSpec(source=model.resolved_tiny_vae_source, revision=model.tiny_vae_revision,
                      model_dir=str(vae_dir), dtype=dtype, component="tiny_vae")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sdxl-turbo-export",
        description="Export the model's networks to OpenVINO IR in the cache replicas read "
                    "(model.backend: openvino). Exports once per model, versions and options.")
    parser.add_argument("--config", help="Serve config file (configs/*.yaml) or an args file")
    parser.add_argument("--app", help="application name in the Serve config")
    parser.add_argument("--source", help="model.source (overrides the config)")
    parser.add_argument("--model-cache-dir", help="model.cache_dir (embedded model)")
    parser.add_argument("--cache-dir", help="model.openvino.cache_dir")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                        help="model.dtype; auto resolves on THIS machine's CPU: export for "
                             "replicas on other CPUs with their dtype")
    parser.add_argument("--weights", choices=["dtype", "int8"], help="model.openvino.weights")
    parser.add_argument("--profile", choices=["quality", "fast"],
                        help="model.profile; fast picks the UNet weights by THIS machine's CPU "
                             "class (as --dtype auto): pass --weights for replicas on others")
    # Internal: the replica's subprocess.
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.spec:
        export_ir(ExportSpec.from_json(args.spec), Path(args.target))
        return 0

    from serve_app.config import load_config
    from serve_app.model import cpu

    raw = _serve_args(args.config, args.app) if args.config else {}
    model = dict(raw.get("model") or {})
    openvino = dict(model.get("openvino") or {})
    for key, value in (("source", args.source), ("cache_dir", args.model_cache_dir),
                       ("dtype", args.dtype), ("profile", args.profile)):
        if value is not None:
            model[key] = value
    if args.cache_dir is not None:
        openvino["cache_dir"] = args.cache_dir
    if args.weights is not None:
        openvino["weights"] = args.weights
    model["openvino"] = openvino
    model["backend"] = "openvino"
    config = load_config({**raw, "model": model})
    choice = cpu.choose_dtype(config.model.dtype, "cpu", cpu.host())
    spec = spec_from_config(config, choice.name, cpu.host().cpu_class)
    specs = [spec]
    if config.model.resolved_vae == "tiny":
        specs.append(tiny_vae_spec(config.model, choice.name))
    root = cache_root(spec.model_dir, config.model.openvino.cache_dir)
    for one in specs:
        started = time.perf_counter()
        try:
            entry, exported = ensure_ir(one, None, export=export_ir, root=root)
        except Exception as exc:
            print(f"sdxl-turbo-export: {exc}", file=sys.stderr)
            return 1
        if exported:
            print(f"exported {entry} ({choice.name}: {choice.reason}) in "
                  f"{time.perf_counter() - started:.1f}s")
        else:
            print(f"already cached: {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
