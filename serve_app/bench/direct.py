"""The pipeline in-process: plain diffusers eager vs the replica's optimised path.

Both run in one process on one pipeline object (eager first, then optimised in place), at
equal prompts and seeds, so the ratio is measured under the same machine load and the
images can be compared pixel by pixel.
"""

from __future__ import annotations

import logging
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.bench.progress import Progress
from serve_app.model import cpu

logger = logging.getLogger(__name__)

FULL = "full"


@dataclass
class StageTimer:
    """Wall time per pipeline stage (text encoders, UNet calls, VAE decode)."""

    totals: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)
        wrapped._bench_inner = fn  # type: ignore[attr-defined]
        return wrapped


def instrument(pipe: Any, timer: StageTimer, *, encode: bool = True) -> None:
    """Time encode_prompt, each UNet call and vae.decode (instance attributes only).

    The optimised path's prompt cache wraps the timed encode_prompt, so text_encoders_s
    counts only real text-encoder work.
    """
    targets = [(pipe.vae, "decode", "vae_decode_s")]
    if encode:
        targets.append((pipe, "encode_prompt", "text_encoders_s"))
    for owner, attr, name in targets:
        current = getattr(owner, attr)
        setattr(owner, attr, timer.wrap(name, getattr(current, "_bench_inner", current)))
    unet = pipe.unet
    if not getattr(unet, "_bench_hooks", False):
        starts: list[float] = []
        unet.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

        def post(*_: Any) -> None:
            elapsed = time.perf_counter() - starts.pop()
            timer.totals["unet_s"] = timer.totals.get("unet_s", 0.0) + elapsed
            timer.calls["unet_s"] = timer.calls.get("unet_s", 0) + 1

        unet.register_forward_hook(post)
        unet._bench_hooks = True


def load_pipeline(model: str, dtype: Any) -> tuple[Any, str]:
    """(pipeline, label). model: 'full' (random weights) or a diffusers directory."""
    if model == FULL:
        from serve_app.bench.full_model import FULL_MODEL_LABEL, build_full_pipeline

        pipe = build_full_pipeline(dtype)
        label = FULL_MODEL_LABEL
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype)
        label = f"weights from {model}"
    pipe.set_progress_bar_config(disable=True)
    return pipe, label


def generate(pipe: Any, prompts: list[str], seeds: list[int], *, steps: int, height: int,
             width: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
    import torch

    from serve_app.model.diffusers_generator import _to_uint8

    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    extra: dict[str, Any] = {}
    if on_step is not None:
        def step_callback(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
            on_step()
            return tensors
        extra["callback_on_step_end"] = step_callback
    with torch.inference_mode():
        images = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=0.0,
                      height=height, width=width, generator=generators,
                      output_type="pt", **extra).images
    return _to_uint8(images)


def warm(pipe: Any, *, warmup: int, batch: int, seed: int, height: int, width: int) -> None:
    """Untimed 1-step runs: oneDNN primitive creation and allocator warm-up."""
    for i in range(warmup):
        generate(pipe, [f"warm-up {i}"] * batch, [seed] * batch, steps=1, height=height,
                 width=width)


def timed_run(pipe: Any, index: int, *, batch: int, steps: int, height: int, width: int,
              prompt: str, seed: int, timer: StageTimer,
              on_step: Callable[[], None] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    # A distinct prompt per run: the prompt cache never hits in timed runs.
    prompts = [f"{prompt} (run {index}, image {j})" for j in range(batch)]
    seeds = [seed + 1000 * index + j for j in range(batch)]
    timer.reset()
    started, cpu_started = time.perf_counter(), time.process_time()
    out = generate(pipe, prompts, seeds, steps=steps, height=height, width=width,
                   on_step=on_step)
    total = time.perf_counter() - started
    # Process CPU seconds (all threads): less sensitive than wall time to other processes
    # taking the cores, though OpenMP spin-waiting still counts in it.
    run = {"total_s": total, "cpu_s": time.process_time() - cpu_started, **dict(timer.totals)}
    if timer.calls.get("unet_s"):
        run["unet_step_s"] = timer.totals["unet_s"] / timer.calls["unet_s"]
    logger.info("run %d: %.2fs %s", index, total, run)
    return run, out


def progress_label(name: str, *, width: int, height: int, steps: int, batch: int) -> str:
    return f"{name} {width}x{height} {steps} steps batch {batch}"


def run_backend(pipe: Any, *, repeat: int, batch: int, steps: int, height: int, width: int,
                prompt: str, seed: int, warmup: int, timer: StageTimer,
                progress: bool = False, label: str = "timed"
                ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Warm-up runs (1 step, not reported) then `repeat` timed runs.

    progress: a stderr bar over the timed runs' denoising steps (repeat x steps).
    """
    warm(pipe, warmup=warmup, batch=batch, seed=seed, height=height, width=width)
    runs, images = [], []
    desc = progress_label(label, width=width, height=height, steps=steps, batch=batch)
    with Progress(repeat * steps, desc, unit="steps", enabled=progress) as bar:
        for i in range(repeat):
            bar.set_postfix(f"run {i + 1}/{repeat}")
            run, out = timed_run(pipe, i, batch=batch, steps=steps, height=height,
                                 width=width, prompt=prompt, seed=seed, timer=timer,
                                 on_step=bar.update if progress else None)
            if bar.n < (i + 1) * steps:  # a pipeline that skipped the step callback
                bar.update((i + 1) * steps - bar.n)
            runs.append(run)
            images.append(out)
    return runs, images


def summarize_runs(runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    keys = sorted({k for r in runs for k in r})
    median = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    return {
        "runs": runs,
        "median": median,
        "min_total_s": min(r["total_s"] for r in runs),
        "max_total_s": max(r["total_s"] for r in runs),
        "images_per_s": batch / median["total_s"],
    }


def image_difference(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, Any]:
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(reference, other)]
    stacked = np.stack(diffs)
    return {
        "mean_abs": float(stacked.mean()),
        "max_abs": int(stacked.max()),
        "p99_abs": float(np.percentile(stacked, 99)),
        "fraction_over_8": float((stacked > 8).mean()),
        "reference_std": float(np.stack(reference).astype(np.float32).std()),
    }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # lscpu missing
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import os

    import diffusers
    import torch

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_class": cpu.host().describe(),
        "cpu_flags": " ".join(sorted(cpu.host().flags)),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }


def resolve_dtype(name: str) -> str:
    """`auto` -> the dtype the service picks on this CPU (bfloat16 where native, else
    float32); explicit names pass through."""
    return cpu.choose_dtype(name, "cpu", cpu.host()).name


def load_instrumented(model: str, dtype_name: str) -> tuple[Any, str, float, StageTimer]:
    """The pipeline with stage timers attached, its label and load time."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    started = time.perf_counter()
    pipe, label = load_pipeline(model, dtype)
    load_s = time.perf_counter() - started
    timer = StageTimer()
    instrument(pipe, timer)
    return pipe, label, load_s, timer


def run_direct(*, model: str, backends: list[str], repeat: int, batch: int, steps: int,
               height: int, width: int, prompt: str, seed: int, warmup: int, dtype_name: str,
               options: Any = None, progress: bool = False,
               tiny_vae: str | None = None) -> dict[str, Any]:
    """Run the backends in order on one pipeline; 'eager' must come first if present."""
    import torch

    from serve_app.config import OptimizationConfig
    from serve_app.model.optimize import optimize_pipeline

    pipe, label, load_s, timer = load_instrumented(model, dtype_name)
    result: dict[str, Any] = {
        "config": {"model": model, "model_label": label, "height": height, "width": width,
                   "batch": batch, "steps": steps, "repeat": repeat, "warmup": warmup,
                   "dtype": dtype_name, "prompt": prompt, "seed": seed, "load_s": load_s},
        "environment": environment(),
        "backends": {},
    }
    images: dict[str, list[np.ndarray]] = {}
    optimized = False
    common: dict[str, Any] = dict(repeat=repeat, batch=batch, steps=steps, height=height,
                                  width=width, prompt=prompt, seed=seed, warmup=warmup,
                                  timer=timer)
    for backend in backends:
        entry: dict[str, Any] = {}
        if backend == "eager":
            if optimized:
                raise ValueError("eager must run before optimized (optimisation is in place)")
        elif backend == "optimized":
            stage = time.perf_counter()
            report = optimize_pipeline(pipe, options or OptimizationConfig(), tiny_vae=tiny_vae)
            entry["applied"], entry["skipped"] = report.applied, report.skipped
            entry["optimize_s"] = time.perf_counter() - stage
            instrument(pipe, timer, encode=False)
            optimized = True
        elif backend == "ipex":
            from serve_app.model.backend import apply_ipex, select_backend

            try:
                choice = select_backend("ipex", torch.__version__)
            except RuntimeError as exc:
                result["backends"][backend] = {"skipped": str(exc)}
                logger.warning("ipex skipped: %s", exc)
                continue
            apply_ipex(choice, pipe, getattr(torch, dtype_name))
            entry["applied"] = ["ipex.optimize"]
            optimized = True
        else:
            raise ValueError(f"unknown backend {backend!r}")
        runs, images[backend] = run_backend(pipe, progress=progress, label=backend, **common)
        entry.update(summarize_runs(runs, batch))
        result["backends"][backend] = entry
    if "eager" in images:
        base = result["backends"]["eager"]["median"]["total_s"]
        for backend, imgs in images.items():
            entry = result["backends"][backend]
            entry["speedup_vs_eager"] = base / entry["median"]["total_s"]
            if backend != "eager":
                entry["image_diff_vs_eager"] = image_difference(images["eager"], imgs)
    return result


def run_interleaved(*, model: str, repeat: int, batch: int, steps: int, height: int,
                    width: int, prompt: str, seed: int, warmup: int, dtype_name: str,
                    options: Any = None, progress: bool = False,
                    tiny_vae: str | None = None) -> dict[str, Any]:
    """Eager and optimised pipelines side by side (two copies in memory, ~2x RAM), runs
    alternating E,O,O,E,E,O...: slow drifts in machine load hit both equally, and each
    pair gives its own ratio."""
    import copy

    import torch

    from serve_app.config import OptimizationConfig
    from serve_app.model.optimize import optimize_pipeline

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    started = time.perf_counter()
    eager, label = load_pipeline(model, dtype)
    load_s = time.perf_counter() - started
    optimized = copy.deepcopy(eager)
    stage = time.perf_counter()
    report = optimize_pipeline(optimized, options or OptimizationConfig(), tiny_vae=tiny_vae)
    applied = report.applied
    optimize_s = time.perf_counter() - stage
    pipes = {"eager": eager, "optimized": optimized}
    timers = {name: StageTimer() for name in pipes}
    for name, pipe in pipes.items():
        instrument(pipe, timers[name])
        warm(pipe, warmup=warmup, batch=batch, seed=seed, height=height, width=width)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pipes}
    images: dict[str, list[np.ndarray]] = {name: [] for name in pipes}
    ratios = []
    desc = progress_label("interleaved", width=width, height=height, steps=steps, batch=batch)
    with Progress(2 * repeat * steps, desc, unit="steps", enabled=progress) as bar:
        for i in range(repeat):
            order = ("eager", "optimized") if i % 2 == 0 else ("optimized", "eager")
            for k, name in enumerate(order):
                bar.set_postfix(f"run {2 * i + k + 1}/{2 * repeat} ({name})")
                run, out = timed_run(pipes[name], i, batch=batch, steps=steps, height=height,
                                     width=width, prompt=prompt, seed=seed,
                                     timer=timers[name],
                                     on_step=bar.update if progress else None)
                if bar.n < (2 * i + k + 1) * steps:
                    bar.update((2 * i + k + 1) * steps - bar.n)
                runs[name].append(run)
                images[name].append(out)
            ratios.append(runs["eager"][-1]["total_s"] / runs["optimized"][-1]["total_s"])
    result: dict[str, Any] = {
        "config": {"model": model, "model_label": label, "height": height, "width": width,
                   "batch": batch, "steps": steps, "repeat": repeat, "warmup": warmup,
                   "dtype": dtype_name, "prompt": prompt, "seed": seed, "load_s": load_s,
                   "interleaved": True},
        "environment": environment(),
        "backends": {name: summarize_runs(runs[name], batch) for name in pipes},
    }
    base = result["backends"]["eager"]["median"]["total_s"]
    for entry in result["backends"].values():
        entry["speedup_vs_eager"] = base / entry["median"]["total_s"]
    opt = result["backends"]["optimized"]
    opt.update(applied=applied, skipped=report.skipped, optimize_s=optimize_s, pair_speedups=ratios,
               median_pair_speedup=statistics.median(ratios),
               image_diff_vs_eager=image_difference(images["eager"], images["optimized"]))
    return result


def format_direct(result: dict[str, Any]) -> str:
    cfg, env = result["config"], result["environment"]
    lines = [
        f"model: {cfg['model']} ({cfg['model_label']})  {cfg['width']}x{cfg['height']}  "
        f"steps {cfg['steps']}  batch {cfg['batch']}  {cfg['dtype']}  "
        f"repeat {cfg['repeat']} (median)",
        f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
        f"diffusers {env['diffusers']}, {env['date']}",
        f"{'backend':<10} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s':>7} {'unet/step':>10} "
        f"{'vae':>7} {'text':>7} {'img/s':>7} {'speedup':>8} {'mean|d|':>8} {'max|d|':>7}",
    ]
    for name, entry in result["backends"].items():
        if "skipped" in entry:
            lines.append(f"{name:<10} skipped: {entry['skipped']}")
            continue
        med = entry["median"]
        diff = entry.get("image_diff_vs_eager", {})
        lines.append(
            f"{name:<10} {med['total_s']:>9.2f} {entry['min_total_s']:>8.2f} "
            f"{entry['max_total_s']:>8.2f} {med.get('cpu_s', float('nan')):>7.1f} "
            f"{med.get('unet_step_s', float('nan')):>10.2f} "
            f"{med.get('vae_decode_s', float('nan')):>7.2f} "
            f"{med.get('text_encoders_s', float('nan')):>7.2f} {entry['images_per_s']:>7.3f} "
            f"{entry.get('speedup_vs_eager', float('nan')):>7.2f}x "
            f"{diff.get('mean_abs', 0.0):>8.3f} {diff.get('max_abs', 0):>7}")
        if entry.get("applied"):
            lines.append(f"{'':<10} applied: {', '.join(entry['applied'])}")
        for lever, why in (entry.get("skipped") or {}).items():
            lines.append(f"{'':<10} skipped: {lever} ({why})")
        if entry.get("pair_speedups"):
            pairs = ", ".join(f"{r:.2f}x" for r in entry["pair_speedups"])
            lines.append(f"{'':<10} interleaved pairs: {pairs} "
                         f"(median {entry['median_pair_speedup']:.2f}x)")
    return "\n".join(lines)


def sweep_point(entry: dict[str, Any], *, width: int, height: int, steps: int,
                batch: int) -> dict[str, Any]:
    return {"width": width, "height": height, "steps": steps, "batch": batch,
            "median_total_s": entry["median"]["total_s"], **entry}


def run_sweep(*, model: str, backend: str, sizes: list[tuple[int, int]], steps_list: list[int],
              batches: list[int], base_width: int, base_height: int, base_steps: int,
              base_batch: int, repeat: int, prompt: str, seed: int, warmup: int,
              dtype_name: str, options: Any = None, progress: bool = False,
              tiny_vae: str | None = None, latency_grid: bool = True) -> dict[str, Any]:
    """One pipeline, one backend, many shapes.

    latency: every size x steps at base_batch (when latency_grid); batches: every batch at
    base_width x base_height and base_steps. Each point gets its own warm-up (oneDNN
    primitives are per shape), then `repeat` timed runs.
    """

    from serve_app.config import OptimizationConfig
    from serve_app.model.optimize import optimize_pipeline

    if backend not in ("eager", "optimized"):
        raise ValueError("sweeps run the 'eager' or the 'optimized' backend")
    pipe, label, load_s, timer = load_instrumented(model, dtype_name)
    result: dict[str, Any] = {
        "config": {"model": model, "model_label": label, "backend": backend,
                   "dtype": dtype_name, "repeat": repeat, "warmup": warmup, "prompt": prompt,
                   "seed": seed, "load_s": load_s,
                   "base": {"width": base_width, "height": base_height, "steps": base_steps,
                            "batch": base_batch}},
        "environment": environment(),
        "latency": [],
        "batches": [],
    }
    if backend == "optimized":
        stage = time.perf_counter()
        report = optimize_pipeline(pipe, options or OptimizationConfig(), tiny_vae=tiny_vae)
        result["applied"], result["skipped"] = report.applied, report.skipped
        result["optimize_s"] = time.perf_counter() - stage
        instrument(pipe, timer, encode=False)
    common: dict[str, Any] = dict(repeat=repeat, prompt=prompt, seed=seed, warmup=warmup,
                                  timer=timer, progress=progress, label=backend)
    if latency_grid:
        for width, height in sizes:
            for steps in steps_list:
                runs, _ = run_backend(pipe, batch=base_batch, steps=steps, height=height,
                                      width=width, **common)
                result["latency"].append(sweep_point(
                    summarize_runs(runs, base_batch), width=width, height=height,
                    steps=steps, batch=base_batch))
    for batch in batches:
        runs, _ = run_backend(pipe, batch=batch, steps=base_steps, height=base_height,
                              width=base_width, **common)
        result["batches"].append(sweep_point(
            summarize_runs(runs, batch), width=base_width, height=base_height,
            steps=base_steps, batch=batch))
    return result


def format_sweep(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"model: {cfg['model']} ({cfg['model_label']})  backend {cfg['backend']}  "
             f"{cfg['dtype']}  repeat {cfg['repeat']} (median)",
             f"{'size':>11} {'steps':>5} {'batch':>5} {'median s':>9} {'min s':>8} "
             f"{'max s':>8} {'img/s':>7}"]
    for point in result["latency"] + result["batches"]:
        size = f"{point['width']}x{point['height']}"
        lines.append(
            f"{size:>11} {point['steps']:>5} {point['batch']:>5} "
            f"{point['median_total_s']:>9.3f} {point['min_total_s']:>8.3f} "
            f"{point['max_total_s']:>8.3f} {point['images_per_s']:>7.3f}")
    return "\n".join(lines)
