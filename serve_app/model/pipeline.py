"""The real generator: SDXL-Turbo through diffusers; the dtype follows the CPU (model/cpu.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from serve_app.config import AppConfig, parse_size
from serve_app.model import cpu
from serve_app.model.backend import BackendChoice, apply_ipex, select_backend
from serve_app.model.source import resolve_model_dir
from serve_app.protocol import GenerationItem, flatten_group, split_images

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class DiffusersGenerator:
    def __init__(self, pipe: Any, *, device: str, dtype: torch.dtype, info: dict[str, Any]):
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.info = info

    def generate(self, items: Sequence[GenerationItem],
                 on_step: Callable[[int], None] | None = None) -> list[list[np.ndarray]]:
        first = items[0]
        if any(item.shape_key != first.shape_key for item in items):
            raise ValueError("generate() takes items of one shape; group them first")
        prompts, seeds = flatten_group(items)
        # One generator per image, so an image depends on its seed, not on its batch-mates.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        step_callback = None
        if on_step is not None:
            def step_callback(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
                on_step(index + 1)
                return tensors
        with torch.inference_mode():
            images = self.pipe(
                prompt=prompts,
                num_inference_steps=first.steps,
                guidance_scale=0.0,  # SDXL-Turbo is trained without classifier-free guidance
                width=first.width,
                height=first.height,
                generator=generators,
                output_type="pt",
                callback_on_step_end=step_callback,
            ).images
        return split_images(items, list(_to_uint8(images)))

    def warmup(self, sizes: Sequence[str]) -> None:
        for size in sizes:
            width, height = parse_size(size)
            start = time.perf_counter()
            self.generate([GenerationItem("warm-up", width, height, steps=2, seed=0)])
            logger.info("warm-up %s: %.2fs", size, time.perf_counter() - start)


def device_and_dtype(num_gpus: float, requested: str,
                     caps: cpu.CpuCapabilities | None = None) -> tuple[str, cpu.DtypeChoice]:
    """A replica given a GPU runs on CUDA (float16 for `auto`); on CPU the dtype follows
    the CPU's bf16 support (serve_app.model.cpu.choose_dtype), and float16 is refused."""
    device = "cuda" if num_gpus > 0 else "cpu"
    return device, cpu.choose_dtype(requested, device, cpu.host() if caps is None else caps)


def _try_openvino(config: AppConfig, backend: BackendChoice) -> DiffusersGenerator | str:
    """`auto` chose OpenVINO: its generator, or the one-line warning that the replica falls
    back to torch with (an export that ran out of memory, a cache it cannot write, sizes
    its IR cannot run). An explicit `openvino` fails the start instead."""
    from serve_app.model.openvino.runtime import load_openvino_generator

    try:
        return load_openvino_generator(config, backend=backend)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warning = (f"backend auto: OpenVINO could not start ({type(exc).__name__}: "
                   f"{detail[:300]}); running torch instead")
        logger.warning("%s", warning, exc_info=True)
        return warning


def load_generator(config: AppConfig) -> DiffusersGenerator:
    from diffusers import StableDiffusionXLPipeline

    model_cfg = config.model
    if model_cfg.backend == "openvino":
        from serve_app.model.openvino.runtime import load_openvino_generator

        return load_openvino_generator(config)
    # Threads follow the replica's CPU count, not the host's core count.
    torch.set_num_threads(config.replica.num_cpus)
    device, choice = device_and_dtype(config.replica.num_gpus, model_cfg.dtype)
    backend = select_backend(model_cfg.backend, torch.__version__, device=device,
                             cpu_class=cpu.host().cpu_class if device == "cpu" else None)
    fallback: str | None = None
    if backend.name == "openvino":
        started_openvino = _try_openvino(config, backend)
        if not isinstance(started_openvino, str):
            return started_openvino
        fallback = started_openvino
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
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    logger.info("pipeline loaded in %.2fs", time.perf_counter() - stage)

    stage = time.perf_counter()
    if device == "cpu":
        from serve_app.model.optimize import optimize_pipeline

        report = optimize_pipeline(pipe, model_cfg.optimization, backend=backend.name)
        applied, skipped = report.applied, report.skipped
    else:
        applied, skipped = [], {}
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
    }
    generator = DiffusersGenerator(pipe, device=device, dtype=dtype, info=info)
    stage = time.perf_counter()
    generator.warmup(model_cfg.warmup_sizes)
    logger.info("model ready in %.2fs total (warm-up %.2fs)", time.perf_counter() - started,
                time.perf_counter() - stage)
    return generator
