"""Run the pipeline on OpenVINO IR: diffusers' StableDiffusionXLPipeline keeps its
tokenizers, scheduler and denoising loop; its four networks are thin wrappers around
compiled OpenVINO models with the call signatures the pipeline uses.

The wrappers are parameterless torch modules (so diffusers' device and dtype look-ups work)
that hand numpy arrays to an OpenVINO infer request and return torch tensors. Inputs and
outputs are float32 whatever the inference precision, so the initial noise is drawn exactly
as in the float32 torch pipeline, and the same seed gives the same bytes.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from serve_app.config import AppConfig, parse_size
from serve_app.model import cpu
from serve_app.model.backend import BackendChoice, select_backend
from serve_app.model.diffusers_generator import (
    DiffusersGenerator,
    device_and_dtype,
    profile_info,
)
from serve_app.model.lora import LoraError, lora_backend_reason
from serve_app.model.openvino import export as export_module
from serve_app.model.openvino.cache import MARKER, ExportSpec, cache_root, not_writable_reason
from serve_app.model.openvino.export import Exporter, ensure_ir
from serve_app.model.source import resolve_model_dir

logger = logging.getLogger(__name__)

# OpenVINO's names for the inference precisions, and the dtype names the service reports.
PRECISION_HINT = {"float32": "f32", "bfloat16": "bf16"}
PRECISION_NAME = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def _config(values: dict[str, Any]) -> Any:
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(values)


class _OVNetwork(torch.nn.Module):
    """One compiled model behind a torch-module face, with no parameters."""

    def __init__(self, compiled: Any, config: dict[str, Any]) -> None:
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.config = _config(config)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def run(self, *inputs: np.ndarray) -> list[torch.Tensor]:
        # share_outputs=False: the request reuses its output buffers on the next call.
        results = self.request.infer(list(inputs), share_inputs=True, share_outputs=False)
        return [torch.from_numpy(results[i]) for i in range(len(self.compiled.outputs))]


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to(torch.float32).numpy())


class _TextOutput(tuple):
    """What encode_prompt reads: item 0, and hidden_states[-2] (penultimate layer)."""

    hidden_states: tuple[torch.Tensor, ...]


class OVTextEncoder(_OVNetwork):
    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = True,
                **unsupported: Any) -> _TextOutput:
        if unsupported:
            raise TypeError(f"OpenVINO text encoder: unsupported arguments {sorted(unsupported)}")
        first, penultimate, last = self.run(
            np.ascontiguousarray(input_ids.to(torch.int64).numpy()))
        out = _TextOutput((first, last))
        out.hidden_states = (penultimate, last)
        return out


class OVUNet(_OVNetwork):
    def __init__(self, compiled: Any, config: dict[str, Any]) -> None:
        super().__init__(compiled, config)
        # _get_add_time_ids checks the time embedding's width through this path.
        self.add_embedding = SimpleNamespace(
            linear_1=SimpleNamespace(in_features=config["add_embedding_in_features"]))

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                timestep_cond: Any = None, cross_attention_kwargs: Any = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        if timestep_cond is not None or cross_attention_kwargs or return_dict:
            raise TypeError("OpenVINO UNet: timestep_cond, cross_attention_kwargs and "
                            "return_dict are not supported")
        if added_cond_kwargs is None or set(added_cond_kwargs) != {"text_embeds", "time_ids"}:
            raise TypeError("OpenVINO UNet: added_cond_kwargs must hold text_embeds and "
                            "time_ids only")
        steps = np.asarray(torch.as_tensor(timestep).to(torch.float32), dtype=np.float32)
        (noise,) = self.run(_f32(sample), steps.reshape(-1), _f32(encoder_hidden_states),
                            _f32(added_cond_kwargs["text_embeds"]),
                            _f32(added_cond_kwargs["time_ids"]))
        return (noise,)


class OVVaeDecoder(_OVNetwork):
    """The VAE as the pipelines use it: decode, and encode for image-to-image (a second
    compiled model, the encoder up to the latent moments)."""

    def __init__(self, compiled: Any, config: dict[str, Any], encoder: Any = None) -> None:
        super().__init__(compiled, config)
        self.encoder_request = None if encoder is None else encoder.create_infer_request()

    def encode(self, image: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        if self.encoder_request is None:
            raise TypeError("OpenVINO VAE: this IR has no encoder")
        result = self.encoder_request.infer([_f32(image)], share_inputs=True,
                                            share_outputs=False)
        posterior = DiagonalGaussianDistribution(torch.from_numpy(result[0]))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        if return_dict:
            raise TypeError("OpenVINO VAE decoder: return_dict is not supported")
        (image,) = self.run(_f32(latents))
        return (image,)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor]:
        return self.decode(latents)


class OVTinyVae(_OVNetwork):
    """model.vae tiny: AutoencoderTiny as the pipelines use it (decode; encode for
    image-to-image, deterministic latents)."""

    def __init__(self, compiled: Any, config: dict[str, Any], encoder: Any) -> None:
        super().__init__(compiled, config)
        self.encoder_request = encoder.create_infer_request()

    def encode(self, image: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

        result = self.encoder_request.infer([_f32(image)], share_inputs=True,
                                            share_outputs=False)
        latents = torch.from_numpy(result[0])
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(self, latents: torch.Tensor, generator: Any = None,
               return_dict: bool = False) -> tuple[torch.Tensor]:
        if return_dict:
            raise TypeError("OpenVINO tiny VAE: return_dict is not supported")
        (image,) = self.run(_f32(latents))
        return (image,)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor]:
        return self.decode(latents)


# DYNAMIC_QUANTIZATION_GROUP_SIZE for int8-weight IR, by CPU class (serve_app.model.cpu),
# with the measurement; model.openvino.dynamic_quantization_group_size unset takes it from
# here, and on classes not listed it is off (0). BENCHMARKS.md, "int8 activations".
DYNAMIC_QUANTIZATION_MEASURED: dict[str, tuple[int, str]] = {
    "avx512_bf16": (256, "UNet step 512x512 2.9-3.3 s against 4.5-5.1 s without it and "
                         "3.9-4.5 s for the bf16 IR (AMD EPYC Zen 4, issue 24)"),
}


def dynamic_quantization_group(configured: int | None, weights: str | None,
                               cpu_class: str) -> tuple[int, str]:
    """(group size, why): 0 (off) unless the IR has int8 weights."""
    if weights != "int8":
        return 0, "off: the IR has no int8 weights"
    if configured is not None:
        return configured, "configured" if configured else "off: configured 0"
    if cpu_class in DYNAMIC_QUANTIZATION_MEASURED:
        group, evidence = DYNAMIC_QUANTIZATION_MEASURED[cpu_class]
        return group, f"measured on {cpu_class} CPUs: {evidence}"
    return 0, f"off: not measured faster on {cpu_class} CPUs"


def compile_properties(threads: int, dtype: str, *, dynamic_quantization_group: int = 0,
                       cache_dir: str | None = None) -> dict[str, Any]:
    """INFERENCE_NUM_THREADS = replica.num_cpus; one stream, latency-first (the replica runs
    one pipeline call at a time); the precision the dtype asks for; the dynamic activation
    quantization group, always set (0: off), so the plugin's own default (32) never decides
    it; the compiled-model cache when given."""
    properties: dict[str, Any] = {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": PRECISION_HINT[dtype],
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": dynamic_quantization_group}
    if cache_dir:
        properties["CACHE_DIR"] = cache_dir
    return properties


COMPILED_SUBDIR = "compiled"


def compiled_cache_dir(configured: str | None, ir_root: Path,
                       cpu_class: str) -> tuple[str | None, str | None]:
    """(the CACHE_DIR to compile with, or None; why none). Per CPU class: a blob compiled
    for one instruction set is not for another, and replicas of several node pools may
    share the IR volume."""
    if configured == "":
        return None, "off: model.openvino.compiled_cache_dir is empty"
    base = Path(configured).expanduser() if configured else ir_root / COMPILED_SUBDIR
    target = base / cpu_class
    reason = not_writable_reason(target)
    if reason is not None:
        return None, f"{target} is not writable ({reason}): every start compiles"
    return str(target), None


def _load_part(model_dir: Path, index: dict[str, Any], name: str) -> Any:
    library, class_name = index[name]
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(model_dir, subfolder=name)


def build_pipeline(ir_dir: Path, model_dir: Path, *, threads: int, dtype: str,
                   core: Any = None, tiny_vae_dir: Path | None = None,
                   dynamic_quantization_group: int = 0,
                   compiled_cache_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A StableDiffusionXLPipeline whose networks run the IR in `ir_dir` (the VAE: the
    tiny VAE's IR in `tiny_vae_dir` when given); the tokenizers and scheduler come from
    `model_dir`. Returns (pipeline, compiled models' properties)."""
    import openvino as ov
    from diffusers import StableDiffusionXLPipeline

    core = ov.Core() if core is None else core
    configs = json.loads((ir_dir / "configs.json").read_text())
    properties = compile_properties(threads, dtype, cache_dir=compiled_cache_dir,
                                    dynamic_quantization_group=dynamic_quantization_group)

    def compiled(directory: Path, name: str) -> Any:
        # By path, not a read model: with CACHE_DIR, a cached network is imported without
        # reading (or hashing) its IR.
        return core.compile_model(str(directory / f"{name}.xml"), "CPU", properties)

    if tiny_vae_dir is None:
        vae: torch.nn.Module = OVVaeDecoder(compiled(ir_dir, "vae_decoder"),
                                            configs["vae_decoder"],
                                            encoder=compiled(ir_dir, "vae_encoder"))
    else:
        tiny_configs = json.loads((tiny_vae_dir / "configs.json").read_text())
        vae = OVTinyVae(compiled(tiny_vae_dir, "tiny_vae_decoder"),
                        tiny_configs["tiny_vae_decoder"],
                        encoder=compiled(tiny_vae_dir, "tiny_vae_encoder"))
    networks: dict[str, Any] = {
        "text_encoder": OVTextEncoder(compiled(ir_dir, "text_encoder"),
                                      configs["text_encoder"]),
        "text_encoder_2": OVTextEncoder(compiled(ir_dir, "text_encoder_2"),
                                        configs["text_encoder_2"]),
        "unet": OVUNet(compiled(ir_dir, "unet"), configs["unet"]),
        "vae": vae,
    }
    index = json.loads((model_dir / "model_index.json").read_text())
    pipe = StableDiffusionXLPipeline(
        tokenizer=_load_part(model_dir, index, "tokenizer"),
        tokenizer_2=_load_part(model_dir, index, "tokenizer_2"),
        scheduler=_load_part(model_dir, index, "scheduler"),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        **networks,
    )
    pipe.set_progress_bar_config(disable=True)
    unet = networks["unet"].compiled
    read_back = {name: unet.get_property(name)
                 for name in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS",
                              "NUM_STREAMS", "PERFORMANCE_HINT",
                              "DYNAMIC_QUANTIZATION_GROUP_SIZE")}
    return pipe, {k: _plain(v) for k, v in read_back.items()}


def _plain(value: Any) -> Any:
    """OpenVINO property values as JSON: element types by their short name ('bf16')."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    if isinstance(getattr(value, "name", None), str):  # OpenVINO enums
        return value.name
    return value if isinstance(value, int | float | bool) else str(value)


def precision_name(hint: str) -> str:
    """OpenVINO's element type name ('bf16') -> the dtype name the service reports."""
    return PRECISION_NAME.get(hint, hint)


def check_sizes(sizes: list[str], unet_config: dict[str, Any]) -> None:
    """The IR traced the UNet's up-sampling for latents its up-blocks divide evenly."""
    factor = 8 * 2 ** max(len(unet_config["block_out_channels"]) - 1, 0)
    bad = [s for s in sizes if any(side % factor for side in parse_size(s))]
    if bad:
        raise ValueError(f"backend openvino: sizes {bad} are not multiples of {factor} "
                         f"pixels, which this model's OpenVINO IR needs")


def load_openvino_generator(config: AppConfig, export: Exporter | None = None,
                            backend: BackendChoice | None = None) -> DiffusersGenerator:
    """model.backend openvino (or `auto` choosing it: `backend` says why): IR from the cache
    (exported first, in a subprocess, when it is not there), compiled with replica.num_cpus
    threads, warmed up. `export` replaces the subprocess export (tests count exports)."""
    model_cfg = config.model
    if model_cfg.loras:  # the config refuses it; a direct caller gets the same line
        raise LoraError(lora_backend_reason("openvino"))
    started = time.perf_counter()
    threads = config.replica.num_cpus
    torch.set_num_threads(threads)  # the scheduler's and the image processor's tensor ops
    device, choice = device_and_dtype(config.replica.num_gpus, model_cfg.dtype)
    # A GPU replica or a missing openvino fails here, with the reason.
    backend = backend or select_backend("openvino", torch.__version__, device=device)
    model_dir = resolve_model_dir(model_cfg.source, model_cfg.revision, model_cfg.cache_dir)
    cpu_class = cpu.host().cpu_class
    weights, weights_reason = model_cfg.resolve_weights(cpu_class)
    spec = ExportSpec(source=model_cfg.source, revision=model_cfg.revision,
                      model_dir=str(model_dir), dtype=choice.name,
                      weights=export_module.ir_weights(model_cfg, cpu_class))
    root = cache_root(model_dir, model_cfg.openvino.cache_dir)
    stage = time.perf_counter()
    ir_dir, exported = ensure_ir(spec, None, root=root,
                                 export=export or export_module.export_in_subprocess)
    tiny_dir: Path | None = None
    if model_cfg.resolved_vae == "tiny":
        tiny_dir, tiny_exported = ensure_ir(
            export_module.tiny_vae_spec(model_cfg, choice.name), None, root=root,
            export=export or export_module.export_in_subprocess)
        exported = exported or tiny_exported
    export_s = time.perf_counter() - stage
    logger.info("OpenVINO IR %s, tiny VAE %s (%s in %.2fs)", ir_dir, tiny_dir,
                "exported" if exported else "cached", export_s)
    configs = json.loads((ir_dir / "configs.json").read_text())
    check_sizes(list(config.limits.allowed_sizes), configs["unet"])
    group, group_reason = dynamic_quantization_group(
        model_cfg.openvino.dynamic_quantization_group_size, spec.weights, cpu_class)
    compiled_cache, cache_skip = compiled_cache_dir(model_cfg.openvino.compiled_cache_dir,
                                                    root, cpu_class)

    stage = time.perf_counter()
    pipe, properties = build_pipeline(ir_dir, model_dir, threads=threads, dtype=choice.name,
                                      tiny_vae_dir=tiny_dir, dynamic_quantization_group=group,
                                      compiled_cache_dir=compiled_cache)
    compile_s = time.perf_counter() - stage
    ran = precision_name(properties["INFERENCE_PRECISION_HINT"])
    reason = f"{choice.reason}; OpenVINO CPU INFERENCE_PRECISION_HINT {ran}"
    if ran != choice.name:
        reason += f" (asked for {choice.name})"
    warnings = [choice.warning] if choice.warning and ran == choice.name else []
    applied = ["openvino_ir"] + (["int8_weights"] if spec.weights == "int8" else [])
    if group:
        applied.append(f"dynamic_quantization_{group}")
    # profile fast without int8 weights on this CPU class: the reason, where users look.
    skipped: dict[str, str] = {} if weights == "int8" or model_cfg.profile != "fast" \
        else {"int8_weights": weights_reason}
    if model_cfg.torch_int8 == "dynamic":
        skipped["int8_unet"] = ("int8 layers (model.torch_int8) run on backend torch; "
                                "backend openvino runs its IR")
    if compiled_cache:
        applied.append("compiled_cache")
    elif cache_skip:
        skipped["compiled_cache"] = cache_skip
    options = model_cfg.optimization
    if options.prompt_cache_size > 0:
        from serve_app.model.optimize.prompt_cache import PromptEmbeddingCache

        pipe.encode_prompt = PromptEmbeddingCache(pipe.encode_prompt, options.prompt_cache_size)
        applied.append("prompt_cache")
    marker = json.loads((ir_dir / MARKER).read_text())
    info = {
        "model": model_cfg.source,
        "backend": "openvino",
        "backend_reason": backend.reason,
        "dtype": ran,
        "dtype_reason": reason,
        "cpu": cpu.host().describe(),
        "device": "cpu",
        "threads": int(properties["INFERENCE_NUM_THREADS"]),
        "optimizations": applied,
        "optimizations_skipped": skipped,
        "warnings": warnings,
        **profile_info(model_cfg, unet=spec.weights or ran,
                       vae_source=model_cfg.resolved_tiny_vae_source if tiny_dir else None),
        "openvino": {
            "ir": str(ir_dir),
            "tiny_vae_ir": None if tiny_dir is None else str(tiny_dir),
            "dynamic_quantization": group_reason,
            "compiled_cache_dir": compiled_cache,
            "exported": exported,
            "export_s": round(export_s, 3),
            "exported_by_pid": marker.get("pid"),
            "compile_s": round(compile_s, 3),
            "weights": spec.weights or "dtype",
            "weights_reason": weights_reason,
            "properties": properties,
        },
    }
    logger.info("backend openvino: %s", info)
    generator = DiffusersGenerator(pipe, device="cpu", dtype=torch.float32, info=info)
    stage = time.perf_counter()
    generator.warmup(model_cfg.warmup_sizes)
    logger.info("model ready in %.2fs total (warm-up %.2fs)", time.perf_counter() - started,
                time.perf_counter() - stage)
    return generator
