"""Many models, one replica (issue 23): what a model switch and a LoRA adapter cost.

* ``lora``: one UNet step at 512x512 (float32, torch eager) with a random LoRA of rank
  `--rank` on the attention projections (SDXL's usual targets): the base UNet, the adapter
  unfused (peft layers active), the adapter fused into the weights; and what switching
  costs each way: load an adapter, `set_adapters` from one adapter to another (unfused),
  `unfuse_lora` + `fuse_lora` of the other (fused). `--model DIR` loads the UNet of a
  diffusers directory (e.g. the full-size random-weight SDXL).
* ``load``: a model switch as a replica pays it: loading a model from a local diffusers
  directory on torch (from_pretrained in float32, then the CPU levers), and from an exported
  OpenVINO IR (`--ir IR_DIR`: read + compile, first with an empty compiled-model cache, then
  with it warm). Each variant runs in its own subprocess, so the peak RSS is its own.
* ``serve``: throughput of a service for one model against two models alternating, in the
  same run: `--models a,b --requests N --rounds R` sends N sequential requests for model a,
  then N alternating a/b, R times, and reports images/s. `--config FILE` starts `serve run
  FILE` (loopback only) and stops it after; else `--url` of a running service.

`python -m serve_app.bench.models lora|load|serve ...`; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _environment() -> dict[str, Any]:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(f for f in line.split(":", 1)[1].split()
                                 if f.startswith(("avx", "amx", "fma", "f16c")))
                break
    except OSError:
        pass
    return {"cpu_flags": flags, "loadavg": os.getloadavg(), "time_utc": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def bench_lora(model: str | None, rank: int, repeat: int, threads: int) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel

    from serve_app.model.lora import random_lora_state_dict

    torch.set_num_threads(threads)
    if model:
        seconds, unet = _timed(lambda: UNet2DConditionModel.from_pretrained(
            Path(model) / "unet", dtype=torch.float32))
    else:
        from serve_app.model.tiny_model import ensure_tiny_model

        seconds, unet = _timed(lambda: UNet2DConditionModel.from_pretrained(
            ensure_tiny_model() / "unet", dtype=torch.float32))
    unet.eval().requires_grad_(False)
    out: dict[str, Any] = {"unet_load_s": round(seconds, 2), "rank": rank, "threads": threads}
    adapters = {name: random_lora_state_dict(unet, rank=rank, seed=seed, b_std=0.01)
                for name, seed in (("a", 1), ("b", 2))}
    out["adapter_params_m"] = round(sum(t.numel() for t in adapters["a"].values()) / 1e6, 2)
    out["adapter_layers"] = len(adapters["a"]) // 2
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size, size, generator=generator)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    text_embeds = torch.randn(1, unet.config.projection_class_embeddings_input_dim
                              - 6 * unet.config.addition_time_embed_dim, generator=generator)
    time_ids = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]])

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return unet(latents, 999, encoder_hidden_states=hidden, added_cond_kwargs={
                "text_embeds": text_embeds, "time_ids": time_ids}).sample

    for name in ("a", "b"):
        seconds, _ = _timed(lambda name=name: unet.load_lora_adapter(
            {k.removeprefix("unet."): v.clone() for k, v in adapters[name].items()},
            prefix=None, adapter_name=name))
        out[f"load_adapter_{name}_s"] = round(seconds, 3)

    def base() -> torch.Tensor:
        unet.disable_lora()
        try:
            return step()
        finally:
            unet.enable_lora()

    def unfused() -> torch.Tensor:
        unet.set_adapters(["a"], weights=[1.0])
        return step()

    def fused() -> torch.Tensor:
        # Fused: what apply_loras serves after unload_lora_weights (plain Linear modules);
        # here the peft wrappers stay (merged) so the round can unfuse again.
        unet.set_adapters(["a"], weights=[1.0])
        unet.fuse_lora(lora_scale=1.0, adapter_names=["a"])
        try:
            return step()
        finally:
            unet.unfuse_lora()

    variants = {"base": base, "unfused_a": unfused, "fused_a": fused}
    first = {name: fn() for name, fn in variants.items()}  # warm-up, untimed
    times: dict[str, list[float]] = {name: [] for name in variants}
    switch: dict[str, list[float]] = {"switch_unfused_s": [], "switch_fused_s": [],
                                      "fuse_s": [], "unfuse_s": []}
    for _ in range(repeat):  # alternating rounds: the machine's load drifts
        for name, fn in variants.items():
            if name == "fused_a":  # the step alone: fuse and unfuse timed below
                unet.set_adapters(["a"], weights=[1.0])
                unet.fuse_lora(lora_scale=1.0, adapter_names=["a"])
                seconds, _ = _timed(step)
                unet.unfuse_lora()
            else:
                seconds, _ = _timed(fn)
            times[name].append(seconds)
        seconds, _ = _timed(lambda: unet.set_adapters(["b"], weights=[1.0]))
        switch["switch_unfused_s"].append(seconds)
        unet.set_adapters(["a"], weights=[1.0])
        seconds, _ = _timed(lambda: unet.fuse_lora(lora_scale=1.0, adapter_names=["a"]))
        switch["fuse_s"].append(seconds)
        seconds, _ = _timed(lambda: (unet.unfuse_lora(),
                                     unet.set_adapters(["b"], weights=[1.0]),
                                     unet.fuse_lora(lora_scale=1.0, adapter_names=["b"])))
        switch["switch_fused_s"].append(seconds)
        seconds, _ = _timed(unet.unfuse_lora)
        switch["unfuse_s"].append(seconds)
    for name, values in times.items():
        out[f"step_{name}_s"] = round(statistics.median(values), 3)
        out[f"step_{name}_all_s"] = [round(t, 3) for t in values]
    for name, values in switch.items():
        out[name] = round(statistics.median(values), 4)
        out[f"{name}_all"] = [round(t, 4) for t in values]
    out["max_abs_diff_unfused_vs_fused"] = float(
        (first["unfused_a"] - first["fused_a"]).abs().max())
    out["max_abs_diff_adapter_vs_base"] = float((first["unfused_a"] - first["base"]).abs().max())
    # Unfusing subtracts the delta it added: in float32 the weights come back close to,
    # not exactly, what they were (why apply_loras fuses into a pipeline of its own):
    out["max_abs_diff_base_after_unfuse"] = float((base() - first["base"]).abs().max())
    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def _load_torch(model: str, threads: int) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from serve_app.config import OptimizationConfig
    from serve_app.model.optimize import optimize_pipeline

    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    seconds, pipe = _timed(lambda: StableDiffusionXLPipeline.from_pretrained(
        model, dtype=torch.float32))
    out["from_pretrained_s"] = round(seconds, 2)
    seconds, report = _timed(lambda: optimize_pipeline(pipe, OptimizationConfig()))
    out["levers_s"] = round(seconds, 2)
    out["levers"] = report.applied
    return out


def _load_openvino(model: str, ir: str, threads: int, compiled: str) -> dict[str, Any]:
    from serve_app.model.openvino.runtime import build_pipeline

    seconds, (pipe, _properties) = _timed(lambda: build_pipeline(
        Path(ir), Path(model), threads=threads, dtype="float32", tiny_vae_dir=None,
        dynamic_quantization_group=0, compiled_cache_dir=compiled or None))
    return {"build_pipeline_s": round(seconds, 2)}


def bench_load(model: str, ir: str | None, threads: int, compiled_cache: str) -> dict[str, Any]:
    """Each variant in a fresh interpreter (imports included in its wall time)."""
    variants: list[tuple[str, list[str]]] = [("torch_disk", ["torch"])]
    if ir:
        variants += [("openvino_ir_cold", ["openvino", "cold"]),
                     ("openvino_ir_warm_compiled_cache", ["openvino", "warm"])]
    out: dict[str, Any] = {}
    for label, args in variants:
        if args[-1] == "cold":
            subprocess.run(["rm", "-rf", compiled_cache], check=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "serve_app.bench.models", "_load_one",
                               model, ir or "", str(threads), compiled_cache, *args],
                              capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_wall_s"] = round(time.perf_counter() - started, 2)
        out[label] = result
    return out


def _load_one(argv: list[str]) -> None:
    model, ir, threads, compiled, kind = argv[0], argv[1], int(argv[2]), argv[3], argv[4]
    if kind == "torch":
        result = _load_torch(model, threads)
    else:
        result = _load_openvino(model, ir, threads, compiled)
    result["peak_rss_gib"] = _peak_rss_gib()
    print(json.dumps(result))


def bench_serve(url: str, models: list[str], requests: int, rounds: int, size: str,
                steps: int) -> dict[str, Any]:
    """Sequential requests (one at a time: the model replica's own speed, no batching) to
    the native API of a running service on loopback."""
    import httpx

    def call(client: httpx.Client, model: str, seed: int) -> None:
        response = client.post(f"{url}/api/text2image", json={
            "prompt": "a lighthouse at dusk", "model": model, "seed": seed,
            "step": steps, "size": size})
        response.raise_for_status()

    out: dict[str, Any] = {"models": models, "requests": requests, "rounds": rounds,
                           "size": size, "steps": steps}
    runs: dict[str, list[float]] = {"one_model": [], "two_alternating": []}
    with httpx.Client(timeout=600) as client:
        for model in models:  # each loaded once before timing
            call(client, model, 0)
        for _ in range(rounds):  # the two sequences alternate: the host's load drifts
            for label, sequence in (("one_model", [models[0]] * requests),
                                    ("two_alternating",
                                     [models[i % 2] for i in range(requests)])):
                started = time.perf_counter()
                for seed, model in enumerate(sequence):
                    call(client, model, seed)
                runs[label].append(requests / (time.perf_counter() - started))
    for label, values in runs.items():
        out[f"{label}_images_per_s"] = round(statistics.median(values), 3)
        out[f"{label}_all"] = [round(v, 3) for v in values]
    return out


def serve_and_bench(config: str, timeout_s: float, **kwargs: Any) -> dict[str, Any]:
    """`serve run config` in its own session (loopback only), bench_serve against it, then
    SIGINT to that session (never `ray stop`)."""
    import signal

    import httpx

    from serve_app.bench.startup import readyz_url, stop_session

    url = readyz_url(config).removesuffix("/readyz")
    # Ray's `serve` CLI run by this interpreter (not the `serve` script's shebang, which
    # in a copied virtualenv can name another one), so the replicas import this checkout.
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; from ray.serve.scripts import cli; sys.exit(cli())",
                             "run", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    started = time.monotonic()

    def stopped(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")  # so that `finally` stops the session

    signal.signal(signal.SIGTERM, stopped)
    try:
        while True:
            if proc.poll() is not None or time.monotonic() - started > timeout_s:
                raise SystemExit(f"serve run {config}: not ready in {timeout_s:g} s")
            try:
                # 10 s, as tests/integration's ready_within: on a loaded host the first
                # answers took over a second (a 1 s poll never saw one).
                if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        result = bench_serve(url, **kwargs)
        result["readyz"] = httpx.get(f"{url}/readyz", timeout=5).json().get("models")
        return result
    finally:
        stop_session(proc)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_load_one":
        _load_one(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench.models")
    sub = parser.add_subparsers(dest="what", required=True)
    lora = sub.add_parser("lora")
    lora.add_argument("--model", help="a diffusers directory (default: the embedded tiny)")
    lora.add_argument("--rank", type=int, default=64)
    lora.add_argument("--repeat", type=int, default=2)
    lora.add_argument("--threads", type=int, default=2)
    load = sub.add_parser("load")
    load.add_argument("--model", required=True)
    load.add_argument("--ir", help="an exported IR directory (sdxl-turbo-export)")
    load.add_argument("--threads", type=int, default=2)
    load.add_argument("--compiled-cache", default="/tmp/sdxl-bench-compiled-cache")
    serve = sub.add_parser("serve")
    serve.add_argument("--url", default="http://127.0.0.1:8000")
    serve.add_argument("--config", help="a serve config to start (loopback) and stop")
    serve.add_argument("--start-timeout", type=float, default=300)
    serve.add_argument("--models", required=True, help="two model ids, comma-separated")
    serve.add_argument("--requests", type=int, default=8)
    serve.add_argument("--rounds", type=int, default=2)
    serve.add_argument("--size", default="512x512")
    serve.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"environment": _environment()}
    if args.what == "lora":
        result.update(bench_lora(args.model, args.rank, args.repeat, args.threads))
    elif args.what == "load":
        result.update(bench_load(args.model, args.ir, args.threads, args.compiled_cache))
    else:
        options = dict(models=args.models.split(","), requests=args.requests,
                       rounds=args.rounds, size=args.size, steps=args.steps)
        if args.config:
            result.update(serve_and_bench(args.config, args.start_timeout, **options))
        else:
            result.update(bench_serve(args.url, **options))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
