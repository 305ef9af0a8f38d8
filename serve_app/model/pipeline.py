"""The real generator: SDXL-Turbo through diffusers; the dtype follows the CPU (model/cpu.py).

`load_generator` (the config's `model.generator`) picks the backend and loads it; the
generator class itself is in serve_app.model.diffusers_generator, which the OpenVINO
runtime builds on too (so neither imports the other's loader).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from serve_app.config import AppConfig
from serve_app.model import cpu
from serve_app.model.backend import BackendChoice, apply_ipex, select_backend
from serve_app.model.diffusers_generator import (
    DTYPES,
    DiffusersGenerator,
    device_and_dtype,
    profile_info,
)
from serve_app.model.lora import apply_loras, lora_backend_reason
from serve_app.model.source import resolve_model_dir

logger = logging.getLogger(__name__)


def _load_tiny(model_cfg: Any, dtype: torch.dtype) -> Any:
    from serve_app.model.tiny_vae import load_tiny_vae, resolve_tiny_vae_dir

    return load_tiny_vae(resolve_tiny_vae_dir(model_cfg.resolved_tiny_vae_source,
                                              model_cfg.tiny_vae_revision, model_cfg.cache_dir),
                         dtype)


def _fallback_warning(exc: Exception) -> str:
    """`auto` chose OpenVINO and it could not start (an export that ran out of memory, a
    cache it cannot write, sizes its IR cannot run): the one line the replica falls back to
    torch with. An explicit `openvino` fails the start instead."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"backend auto: OpenVINO could not start ({type(exc).__name__}: {detail[:300]}); "
            f"running torch instead")


def load_generator(config: AppConfig) -> DiffusersGenerator:
    from diffusers import StableDiffusionXLPipeline

    model_cfg = config.model
    if model_cfg.backend == "openvino":
        from serve_app.model.openvino.runtime import load_openvino_generator

        return load_openvino_generator(config)
    # Threads follow the replica's CPU count, not the host's core count.
    torch.set_num_threads(config.replica.num_cpus)
    device, choice = device_and_dtype(config.replica.num_gpus, model_cfg.dtype)
    cpu_class = cpu.host().cpu_class if device == "cpu" else None
    backend = select_backend(model_cfg.backend, torch.__version__, device=device,
                             cpu_class=cpu_class, profile=model_cfg.profile)
    fallback: str | None = None
    if backend.name == "openvino" and model_cfg.loras:
        # An exported IR has no adapters: `auto` runs a model with adapters on torch rather
        # than give the base model's images (an explicit `openvino` fails in the config).
        backend = BackendChoice("torch", f"auto: {lora_backend_reason('openvino')}")
    if backend.name == "openvino":
        from serve_app.model.openvino.runtime import load_openvino_generator

        try:
            return load_openvino_generator(config, backend=backend)
        except Exception as exc:
            fallback = _fallback_warning(exc)
            logger.warning("%s", fallback, exc_info=True)
            backend = BackendChoice("torch", "auto: OpenVINO failed to start (see warnings)")
    dtype_name, dtype = choice.name, DTYPES[choice.name]
    warnings = [choice.warning] if choice.warning else []
    if fallback:
        warnings.append(fallback)
    if choice.warning:
        logger.warning("%s", choice.warning)
    logger.info("dtype %s (%s)", dtype_name, choice.reason)

    started = time.perf_counter()
    model_dir = resolve_model_dir(model_cfg.source, model_cfg.revision, model_cfg.cache_dir)
    logger.info("model files at %s (%.2fs)", model_dir, time.perf_counter() - started)

    stage = time.perf_counter()
    tiny_vae = model_cfg.resolved_vae == "tiny"
    # The tiny VAE replaces the full one before it is loaded: no 160 M-parameter VAE in memory.
    parts: dict[str, Any] = {"vae": _load_tiny(model_cfg, dtype)} if tiny_vae else {}
    int8_unet, int8_reason = model_cfg.resolve_torch_int8(cpu_class)
    int8_cache = None
    if int8_unet and device == "cpu" and backend.name == "torch":
        from serve_app.model.optimize.int8_cache import Int8CacheUse

        int8_cache = Int8CacheUse.open(model_cfg, model_dir, dtype_name)
    if int8_cache is not None and int8_cache.unet is not None:
        parts["unet"] = int8_cache.unet  # the cached int8 UNet: no float UNet is loaded
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype, **parts)
    pipe.set_progress_bar_config(disable=True)
    # Fused before the levers and IPEX, which rewrite the Linear modules adapters target.
    loras = apply_loras(pipe, model_cfg.loras, model_cfg.cache_dir)
    pipe.to(device)
    logger.info("pipeline loaded in %.2fs", time.perf_counter() - stage)

    stage = time.perf_counter()
    if device == "cpu":
        from serve_app.model.optimize import optimize_pipeline

        report = optimize_pipeline(pipe, model_cfg.optimization, backend=backend.name,
                                   int8_unet=int8_unet,
                                   int8_sink=int8_cache.sink if int8_cache else None)
        applied, skipped = report.applied, report.skipped
        if int8_cache is not None:
            int8_cache.finish(applied, skipped)
    else:
        applied, skipped = [], ({"int8_unet": f"device {device}"} if int8_unet else {})
    if not int8_unet and model_cfg.profile == "fast":
        skipped = {**skipped, "int8_unet": int8_reason}
    # What OpenVINO would run here: int8 weights are said to be skipped, not pretended; a
    # profile fast that picks the dtype's weights on this CPU class says why.
    # (With int8 layers running, OpenVINO's pick of weights says nothing about this UNet.)
    int8_layers = "int8_unet" in applied
    weights, weights_reason = model_cfg.resolve_weights(cpu_class)
    if weights == "int8":
        runs = "int8 layers" if int8_layers else dtype_name
        skipped = {**skipped, "int8_weights": f"int8 weights run on backend openvino; "
                                              f"backend {backend.name} runs {runs}"}
    elif model_cfg.profile == "fast" and not int8_layers:
        skipped = {**skipped, "int8_weights": weights_reason}
    apply_ipex(backend, pipe, dtype)
    logger.info("backend %s (%s), optimisations %s, skipped %s, in %.2fs", backend.name,
                backend.reason, applied, skipped, time.perf_counter() - stage)

    info = {
        "model": model_cfg.source,
        "backend": backend.name,
        "backend_reason": backend.reason,
        "dtype": dtype_name,
        "dtype_reason": choice.reason,
        "cpu": cpu.host().describe() if device == "cpu" else None,
        "device": device,
        "threads": torch.get_num_threads(),
        "optimizations": applied,
        "optimizations_skipped": skipped,
        "warnings": warnings,
        "loras": loras,
        "torch_int8_reason": int8_reason,
        "torch_int8_cache": int8_cache.describe() if int8_cache else None,
        **profile_info(model_cfg, unet="int8" if "int8_unet" in applied else dtype_name,
                       vae_source=model_cfg.resolved_tiny_vae_source if tiny_vae else None),
    }
    generator = DiffusersGenerator(pipe, device=device, dtype=dtype, info=info)
    stage = time.perf_counter()
    generator.warmup(model_cfg.warmup_sizes)
    logger.info("model ready in %.2fs total (warm-up %.2fs)", time.perf_counter() - started,
                time.perf_counter() - stage)
    return generator
