"""Backends side by side, each loaded exactly as a replica loads it (`load_generator`).

Every backend runs in its own child process, one after another (never two at once), so its
peak memory is its own and one backend's caches cannot help the next. Rounds repeat the
whole sequence, so a slow spell of a shared machine lands on every backend, not on one.
Per backend and case (size x batch): whole-call time, the UNet step and the VAE decode
(timed inside the same calls), load time, peak RSS, and the image difference against the
reference backend (the first one listed) at the same seed.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# What each label configures on top of the model's defaults.
EAGER_OFF = {"channels_last": False, "prepack_linear": False, "prepack_conv": False,
             "fuse_geglu": False, "fuse_attention": False, "cross_attention_kv_cache": False,
             "prompt_cache_size": 0}
BACKENDS: dict[str, dict[str, Any]] = {
    "torch-eager": {"backend": "torch", "optimization": EAGER_OFF},
    "torch": {"backend": "torch"},
    "openvino": {"backend": "openvino"},
    "openvino-int8": {"backend": "openvino", "openvino": {"weights": "int8"}},
    # int8 weights with int8 activations quantized on the fly (group 256 and 1024).
    "openvino-int8-dq256": {"backend": "openvino", "openvino": {
        "weights": "int8", "dynamic_quantization_group_size": 256}},
    "openvino-int8-dq1024": {"backend": "openvino", "openvino": {
        "weights": "int8", "dynamic_quantization_group_size": 1024}},
    # The full-precision UNet with the tiny VAE.
    "openvino-tiny-vae": {"backend": "openvino", "vae": "tiny"},
    "torch-tiny-vae": {"backend": "torch", "vae": "tiny"},
    # The UNet's layers in int8 (model.torch_int8), with the levers and without, and with
    # the tiny VAE (what profile fast runs on avx2).
    "torch-int8": {"backend": "torch", "torch_int8": "dynamic"},
    "torch-int8-tiny-vae": {"backend": "torch", "vae": "tiny", "torch_int8": "dynamic"},
    "torch-eager-int8-tiny-vae": {"backend": "torch", "vae": "tiny", "torch_int8": "dynamic",
                                  "optimization": EAGER_OFF},
    # int8 weights with the tiny VAE on every CPU class (profile fast picks them on some).
    "openvino-int8-tiny-vae": {"backend": "openvino", "vae": "tiny",
                               "openvino": {"weights": "int8"}},
    # model.profile fast: the tiny VAE and, on OpenVINO, the UNet weights measured faster on
    # this CPU class (serve_app.config.FAST_WEIGHTS_MEASURED).
    "openvino-fast": {"backend": "openvino", "profile": "fast"},
    "torch-fast": {"backend": "torch", "profile": "fast"},
    "auto": {"backend": "auto"},
    "auto-fast": {"backend": "auto", "profile": "fast"},
}
PROMPT = "a photo of an astronaut riding a horse on mars"


@dataclass(frozen=True)
class Case:
    width: int
    height: int
    batch: int
    steps: int | None = None  # None: the run's --step

    @property
    def name(self) -> str:
        name = f"{self.width}x{self.height} b{self.batch}"
        return name if self.steps is None else f"{name} s{self.steps}"

    @classmethod
    def parse(cls, text: str) -> Case:
        """`512x512`, `512x512x4` (batch 4), `512x512:1` (1 step)."""
        shape, _, steps = text.lower().partition(":")
        parts = shape.split("x")
        if (len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts)
                or (steps and not (steps.isdigit() and int(steps) > 0))):
            raise ValueError(f"case {text!r}: want WIDTHxHEIGHT or WIDTHxHEIGHTxBATCH, "
                             f"optionally :STEPS")
        width, height, *batch = (int(p) for p in parts)
        return cls(width, height, batch[0] if batch else 1, int(steps) if steps else None)


def parse_cases(text: str) -> list[Case]:
    return [Case.parse(part) for part in text.split(",") if part.strip()]


def parse_backends(text: str) -> list[str]:
    labels = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [label for label in labels if label not in BACKENDS]
    if unknown or not labels:
        raise ValueError(f"backends {unknown or text!r}: choose from {', '.join(BACKENDS)}")
    return labels


def app_config(label: str, *, model: str, dtype: str, threads: int, cache_dir: str,
               sizes: list[str], tiny_vae: str | None = None) -> dict[str, Any]:
    model_cfg: dict[str, Any] = {"source": model, "dtype": dtype, "warmup_sizes": [],
                                 "openvino": {"cache_dir": cache_dir},
                                 "tiny_vae_source": tiny_vae}
    for key, value in BACKENDS[label].items():
        if isinstance(value, dict):
            model_cfg[key] = {**model_cfg.get(key, {}), **value}
        else:
            model_cfg[key] = value
    return {"model": model_cfg, "replica": {"num_cpus": threads},
            "limits": {"allowed_sizes": sizes}}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: load one backend, time every case, save the first image."""
    from serve_app.bench.direct import StageTimer, instrument
    from serve_app.config import AppConfig
    from serve_app.model.pipeline import load_generator
    from serve_app.protocol import GenerationItem

    cases = [Case(**c) for c in spec["cases"]]
    sizes = sorted({f"{c.width}x{c.height}" for c in cases})
    config = AppConfig.model_validate(app_config(
        spec["label"], model=spec["model"], dtype=spec["dtype"], threads=spec["threads"],
        cache_dir=spec["cache_dir"], sizes=sizes, tiny_vae=spec.get("tiny_vae")))
    started = time.perf_counter()
    generator = load_generator(config)
    out: dict[str, Any] = {"label": spec["label"], "load_s": time.perf_counter() - started,
                           "backend": generator.info.get("backend"),
                           "dtype": generator.info.get("dtype"),
                           "applied": generator.info.get("optimizations", []),
                           "cases": {}}
    timer = StageTimer()
    instrument(generator.pipe, timer)
    warmed: set[tuple[int, int, int]] = set()
    for case in cases:
        def item(steps: int, seed: int, case: Case = case) -> GenerationItem:
            return GenerationItem(PROMPT, case.width, case.height, steps=steps, seed=seed,
                                  count=case.batch)
        shape = (case.width, case.height, case.batch)
        if shape not in warmed:  # the first call at a shape pays set-up costs, once per shape
            generator.generate([item(1, 1)])
            warmed.add(shape)
        runs = []
        images: list[np.ndarray] = []
        for _ in range(spec["repeat"]):
            timer.reset()
            began = time.perf_counter()
            images = generator.generate([item(case.steps or spec["steps"], spec["seed"])])[0]
            total = time.perf_counter() - began
            unet_calls = timer.calls.get("unet_s", 0)
            runs.append({"total_s": total, "unet_calls": unet_calls,
                         "unet_step_s": timer.totals.get("unet_s", 0.0) / max(unet_calls, 1),
                         "vae_decode_s": timer.totals.get("vae_decode_s", 0.0)})
        image_path = Path(spec["work_dir"]) / f"{spec['label']}-{case.name.replace(' ', '-')}.npy"
        np.save(image_path, images[0])
        out["cases"][case.name] = {"runs": runs, "image": str(image_path)}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["peak_rss_children_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return out


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """One backend in a fresh interpreter; its result is the last line it prints."""
    proc = subprocess.run([sys.executable, "-m", "serve_app.bench.backends", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"label": spec["label"], "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_backends(*, labels: list[str], cases: list[Case], model: str, dtype: str,
                 threads: int, rounds: int, repeat: int, steps: int, seed: int,
                 cache_dir: str | None = None, work_dir: str | None = None,
                 tiny_vae: str | None = None, spawn_fn: Any = spawn) -> dict[str, Any]:
    from serve_app.bench.direct import environment

    work = Path(work_dir or tempfile.mkdtemp(prefix="sdxl-bench-backends-"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"model": model, "dtype": dtype, "threads": threads, "repeat": repeat,
            "steps": steps, "seed": seed, "cases": [asdict(c) for c in cases],
            "cache_dir": cache_dir or str(work / "openvino-ir"), "work_dir": str(work),
            "tiny_vae": tiny_vae}
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    log = work / "results.jsonl"  # each child's result as it ends: a stopped run keeps them
    for _ in range(rounds):
        for label in labels:
            results[label].append(spawn_fn({**base, "label": label}))
            with log.open("a") as out:
                out.write(json.dumps(results[label][-1]) + "\n")
    return {"mode": "backends", "environment": environment(),
            "config": {k: v for k, v in base.items() if k not in ("work_dir",)},
            "rounds": results, "backends": summarize(labels, cases, results)}


def load_results(work_dir: str, labels: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The child results earlier runs appended to WORK_DIR/results.jsonl, per label: each
    backend can run as its own command (a shared machine's lock held minutes, not an hour)
    and be summarized against one reference afterwards."""
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    log = Path(work_dir) / "results.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        if entry.get("label") in results:
            results[entry["label"]].append(entry)
    missing = [label for label, runs in results.items() if not runs]
    if missing:
        raise ValueError(f"{log}: no results for {', '.join(missing)}")
    return results


def summarize_saved(*, labels: list[str], cases: list[Case], work_dir: str,
                    config: dict[str, Any]) -> dict[str, Any]:
    """run_backends' result from saved child results (no backend is run)."""
    from serve_app.bench.direct import environment

    results = load_results(work_dir, labels)
    return {"mode": "backends", "environment": environment(), "config": config,
            "rounds": results, "backends": summarize(labels, cases, results)}


def summarize(labels: list[str], cases: list[Case],
              results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over every timed call of every round; ratios and image differences against
    the first backend (the reference)."""
    from serve_app.bench.direct import image_difference

    summary: dict[str, Any] = {}
    for label in labels:
        good = [r for r in results[label] if "error" not in r]
        if not good:
            summary[label] = {"error": results[label][-1].get("error", "no result")}
            continue
        entry: dict[str, Any] = {
            "backend": good[-1]["backend"], "dtype": good[-1]["dtype"],
            "applied": good[-1]["applied"],
            "load_s": statistics.median(r["load_s"] for r in good),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in good),
            "export_peak_rss_gb": max(r.get("peak_rss_children_gb", 0.0) for r in good),
            "cases": {}}
        for case in cases:
            runs = [run for r in good for run in r["cases"][case.name]["runs"]]
            entry["cases"][case.name] = {
                "calls": len(runs),
                "total_s": statistics.median(x["total_s"] for x in runs),
                "unet_step_s": statistics.median(x["unet_step_s"] for x in runs),
                "vae_decode_s": statistics.median(x["vae_decode_s"] for x in runs),
                "images_per_s": case.batch / statistics.median(x["total_s"] for x in runs),
                "image": good[-1]["cases"][case.name]["image"]}
        summary[label] = entry
    reference = labels[0]
    ref = summary.get(reference, {})
    for entry in summary.values():
        if "error" in entry or "error" in ref:
            continue
        for name, case in entry["cases"].items():
            ref_case = ref["cases"][name]
            case["speedup_vs_reference"] = ref_case["total_s"] / case["total_s"]
            case["image_diff_vs_reference"] = image_difference(
                [np.load(ref_case["image"])], [np.load(case["image"])])
    return summary


def format_table(result: dict[str, Any]) -> str:
    env, config = result["environment"], result["config"]
    labels = list(result["backends"])
    lines = [f"# {env['cpu']} ({env['cpu_class']}), {config['threads']} threads, "
             f"dtype {config['dtype']}, {config['steps']} steps, {env['date']}",
             f"# reference: {labels[0]}; medians over "
             f"{len(next(iter(result['rounds'].values())))} round(s) x {config['repeat']} call(s)",
             "| backend | dtype | case | call s | vs ref | UNet step s | VAE decode s | "
             "images/s | mean/max diff | peak RSS GB | load s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, entry in result["backends"].items():
        if "error" in entry:
            lines.append(f"| {label} | - | failed: {entry['error'][:120]} |")
            continue
        for name, case in entry["cases"].items():
            diff = case.get("image_diff_vs_reference", {})
            lines.append(
                f"| {label} | {entry['dtype']} | {name} | {case['total_s']:.2f} | "
                f"{case.get('speedup_vs_reference', float('nan')):.2f}x | "
                f"{case['unet_step_s']:.3f} | {case['vae_decode_s']:.3f} | "
                f"{case['images_per_s']:.3f} | {diff.get('mean_abs', float('nan')):.2f} / "
                f"{diff.get('max_abs', '-')} | {entry['peak_rss_gb']:.1f} | "
                f"{entry['load_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run_child(json.loads(sys.argv[1]))), flush=True)
