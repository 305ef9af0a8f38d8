"""`sdxl-turbo-bench`: pipeline benchmark (eager vs optimised) or HTTP load against a URL."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

OPTIMIZATION_SWITCHES = ("channels_last", "prepack_linear", "prepack_conv", "fuse_geglu",
                         "fuse_attention", "cross_attention_kv_cache", "prompt_cache")


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4: {text!r}")
    return values


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x512,1024x768' -> [(512, 512), (1024, 768)] as (width, height)."""
    sizes = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected WxH like 512x512: {item!r}") from None
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise argparse.ArgumentTypeError(f"width and height must be multiples of 8: {item}")
        sizes.append((width, height))
    if not sizes:
        raise argparse.ArgumentTypeError("expected sizes like 512x512,1024x1024")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-turbo-bench",
        description="Time SDXL-Turbo generation in-process (eager vs optimised), or load a "
                    "running service over HTTP with --url.")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="auto (default): what the service picks on this CPU, bfloat16 "
                             "with native bf16 (amx_bf16, avx512_bf16), float32 otherwise")
    parser.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16",
                        help="same as --dtype bfloat16 (the reference tool's flag)")
    parser.add_argument("--fp32", dest="dtype", action="store_const", const="float32",
                        help="same as --dtype float32")
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per backend")
    parser.add_argument("--step", type=int, default=4, help="denoising steps")
    parser.add_argument("--prompt", default="A photo of an astronaut riding a horse on mars")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed 1-step runs per backend before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--model", default="full",
                        help="diffusers model directory, or 'full' (default): SDXL-Turbo's "
                             "full-size architecture with random weights, built in memory")
    parser.add_argument("--backend", choices=("eager", "optimized", "ipex"),
                        default="optimized")
    parser.add_argument("--compare", action="store_true",
                        help="also run plain diffusers eager first, in the same process, and "
                             "report the speed-up and the image difference")
    parser.add_argument("--interleave", action="store_true",
                        help="with --compare: keep eager and optimised copies (2x RAM) and "
                             "alternate their runs, for a ratio robust to load drift")
    parser.add_argument("--disable", action="append", default=[],
                        choices=OPTIMIZATION_SWITCHES, help="turn one optimisation off")
    parser.add_argument("--only", action="append", default=[], choices=OPTIMIZATION_SWITCHES,
                        help="turn every optimisation off except these")
    parser.add_argument("--tiny-vae", default=None,
                        help="directory of an AutoencoderTiny to decode with (opt-in), or "
                             "'random' for random weights at taesdxl's size (speed only); "
                             "with --backends: model.tiny_vae_source of the tiny-VAE rows")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr during timed runs (default: only when "
                             "stderr is a terminal)")
    sweep = parser.add_argument_group(
        "sweeps and charts (in-process sweeps run one backend: --backend)")
    sweep.add_argument("--sweep-sizes", type=parse_sizes, default=None, metavar="WxH,...",
                       help="latency sweep over sizes (x --sweep-steps), e.g. 512x512,1024x1024")
    sweep.add_argument("--sweep-steps", type=parse_ints, default=None, metavar="N,...",
                       help="latency sweep over denoising steps (x --sweep-sizes), e.g. 1,2,4")
    sweep.add_argument("--sweep-batches", type=parse_ints, default=None, metavar="N,...",
                       help="throughput sweep over batch sizes at --width/--height/--step")
    sweep.add_argument("--sweep-concurrency", type=parse_ints, default=None, metavar="N,...",
                       help="with --url: one load run (-n requests) per concurrency")
    sweep.add_argument("--plot", default=None, metavar="PATH.png",
                       help="write a PNG chart of the results (needs matplotlib: the "
                            "'bench' extra)")
    sweep.add_argument("--plot-with", action="append", default=[], metavar="JSON",
                       help="also chart an earlier --json result (e.g. a load sweep)")
    sweep.add_argument("--plot-title", default=None)
    side = parser.add_argument_group(
        "backends side by side (each in its own process, as a replica loads it)")
    side.add_argument("--backends", default=None, metavar="LABEL,...",
                      help="e.g. torch-eager,torch,openvino,openvino-int8 (first = reference);"
                           " --model must be a diffusers directory")
    side.add_argument("--cases", default="512x512,1024x1024,512x512x4",
                      metavar="WxH[xB][:STEPS],...",
                      help="sizes, batch per call and steps (default --step) (default: "
                           "%(default)s)")
    side.add_argument("--rounds", type=int, default=1,
                      help="times the whole backend sequence runs (default: %(default)s)")
    side.add_argument("--cache-dir", default=None, help="OpenVINO IR cache (default: a temp dir)")
    side.add_argument("--work-dir", default=None, help="images for the diffs (default: temp)")
    side.add_argument("--summarize", action="store_true",
                      help="run nothing: the table of the results earlier --backends runs "
                           "left in --work-dir (the first label is the reference)")
    load = parser.add_argument_group("HTTP load mode (no Ray started: it targets a URL)")
    load.add_argument("--url", default=None, help="e.g. http://127.0.0.1:8000")
    load.add_argument("-n", "--requests", type=int, default=50)
    load.add_argument("-c", "--concurrency", type=int, default=5)
    load.add_argument("--number", type=int, default=1, help="images per request")
    load.add_argument("--api-key", default=os.environ.get("SDXL_BENCH_API_KEY"))
    load.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    return parser


def optimization_options(args: argparse.Namespace) -> Any:
    from serve_app.config import OptimizationConfig

    switches = {name: True for name in OPTIMIZATION_SWITCHES}
    if args.only:
        switches = {name: name in args.only for name in OPTIMIZATION_SWITCHES}
    for name in args.disable:
        switches[name] = False
    fields: dict[str, Any] = {k: v for k, v in switches.items() if k != "prompt_cache"}
    if not switches["prompt_cache"]:
        fields["prompt_cache_size"] = 0
    return OptimizationConfig(**fields)


def tiny_vae_dir(args: argparse.Namespace) -> str | None:
    """--tiny-vae: a directory, or 'random' (random weights at taesdxl's size, written to a
    temporary directory)."""
    if args.tiny_vae == "random":
        import tempfile

        from serve_app.bench.full_model import save_random_tiny_vae

        return str(save_random_tiny_vae(tempfile.mkdtemp(prefix="tiny-vae-")))
    return args.tiny_vae


def load_once(args: argparse.Namespace, body: dict[str, Any], concurrency: int,
              progress: bool) -> dict[str, Any]:
    from serve_app.bench.load import run_load
    from serve_app.bench.progress import Progress

    counts = {"ok": 0, "failed": 0}
    with Progress(args.requests, f"HTTP -c {concurrency}", unit="requests",
                  enabled=progress) as bar:
        def on_result(result: Any) -> None:
            counts["ok" if result.ok else "failed"] += 1
            bar.set_postfix(f"ok {counts['ok']}, failed {counts['failed']}")
            bar.update()

        return run_load(args.url, requests=args.requests, concurrency=concurrency, body=body,
                        api_key=args.api_key, timeout_s=args.timeout,
                        on_result=on_result).to_dict()


def run_load_mode(args: argparse.Namespace) -> dict[str, Any]:
    from serve_app.bench.load import format_load
    from serve_app.bench.progress import progress_enabled

    if args.sweep_sizes or args.sweep_steps or args.sweep_batches:
        raise SystemExit("--sweep-sizes/--sweep-steps/--sweep-batches are in-process sweeps; "
                         "with --url use --sweep-concurrency")
    progress = progress_enabled(args.progress)
    body = {"prompt": args.prompt, "size": f"{args.width}x{args.height}", "step": args.step,
            "batch": args.batch, "number": args.number}
    if args.sweep_concurrency:
        points = []
        for concurrency in args.sweep_concurrency:
            summary = load_once(args, body, concurrency, progress)
            print(format_load(summary))
            points.append({"concurrency": concurrency, "summary": summary})
        return {"mode": "load-sweep", "url": args.url, "body": body,
                "requests_per_point": args.requests, "sweep": points,
                "command": " ".join(["sdxl-turbo-bench", *sys.argv[1:]])}
    summary = load_once(args, body, args.concurrency, progress)
    result = {"mode": "load", "url": args.url, "body": body, "summary": summary}
    print(format_load(summary))
    return result


def run_sweep_mode(args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    from serve_app.bench.direct import format_sweep, resolve_dtype, run_sweep

    if args.compare or args.interleave:
        raise SystemExit("sweeps run one backend; drop --compare/--interleave")
    latency_grid = bool(args.sweep_sizes or args.sweep_steps)
    result = run_sweep(
        model=args.model, backend=args.backend,
        sizes=args.sweep_sizes or [(args.width, args.height)],
        steps_list=args.sweep_steps or [args.step], batches=args.sweep_batches or [],
        base_width=args.width, base_height=args.height, base_steps=args.step,
        base_batch=args.batch, repeat=args.repeat, prompt=args.prompt, seed=args.seed,
        warmup=args.warmup, dtype_name=resolve_dtype(args.dtype),
        options=optimization_options(args), progress=progress,
        tiny_vae=tiny_vae_dir(args), latency_grid=latency_grid)
    result["mode"] = "sweep"
    result["command"] = " ".join(["sdxl-turbo-bench", *sys.argv[1:]])
    print(format_sweep(result))
    return result


def run_backends_mode(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from serve_app.bench.backends import format_table, parse_backends, parse_cases, run_backends
    from serve_app.bench.direct import FULL

    if args.model == FULL:
        raise SystemExit("--backends loads the model from files, as a replica does: save the "
                         "full-size model first (python -m serve_app.bench.full_model DIR) "
                         "and pass --model DIR")
    try:
        labels, cases = parse_backends(args.backends), parse_cases(args.cases)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if args.summarize:
        if not args.work_dir:
            raise SystemExit("--summarize reads the results of earlier runs: pass --work-dir")
        from serve_app.bench.backends import summarize_saved

        config = {"model": args.model, "dtype": args.dtype, "steps": args.step,
                  "threads": args.threads or len(os.sched_getaffinity(0)),
                  "repeat": args.repeat, "seed": args.seed, "cases": args.cases}
        try:
            result = summarize_saved(labels=labels, cases=cases, work_dir=args.work_dir,
                                     config=config)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        result["command"] = " ".join(["sdxl-turbo-bench", *sys.argv[1:]])
        print(format_table(result))
        return result
    result = run_backends(
        labels=labels, cases=cases, model=args.model, dtype=args.dtype,
        threads=args.threads or len(os.sched_getaffinity(0)), rounds=args.rounds,
        repeat=args.repeat, steps=args.step, seed=args.seed, cache_dir=args.cache_dir,
        work_dir=args.work_dir, tiny_vae=tiny_vae_dir(args))
    result["command"] = " ".join(["sdxl-turbo-bench", *sys.argv[1:]])
    print(format_table(result))
    return result


def run_direct_mode(args: argparse.Namespace) -> dict[str, Any]:
    from serve_app.bench.direct import (
        format_direct,
        resolve_dtype,
        run_direct,
        run_interleaved,
    )
    from serve_app.bench.progress import progress_enabled

    if args.sweep_concurrency:
        raise SystemExit("--sweep-concurrency is an HTTP load sweep: it needs --url")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = progress_enabled(args.progress)
    if args.sweep_sizes or args.sweep_steps or args.sweep_batches:
        return run_sweep_mode(args, progress)
    backends = [args.backend]
    if args.compare and args.backend != "eager":
        backends.insert(0, "eager")
    common = dict(
        model=args.model, repeat=args.repeat, batch=args.batch, steps=args.step,
        height=args.height, width=args.width, prompt=args.prompt, seed=args.seed,
        warmup=args.warmup, dtype_name=resolve_dtype(args.dtype),
        options=optimization_options(args), progress=progress,
        tiny_vae=tiny_vae_dir(args))
    if args.interleave:
        if backends != ["eager", "optimized"]:
            raise SystemExit("--interleave needs --compare with --backend optimized")
        result = run_interleaved(**common)
    else:
        result = run_direct(backends=backends, **common)
    result["mode"] = "direct"
    result["command"] = " ".join(["sdxl-turbo-bench", *sys.argv[1:]])
    print(format_direct(result))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # httpx logs every request at INFO: one line per request would bury the summary.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.url:
        result = run_load_mode(args)
    elif args.backends:
        result = run_backends_mode(args)
    else:
        result = run_direct_mode(args)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    if args.plot:
        from serve_app.bench.plot import plot_results

        others = [json.loads(Path(p).read_text()) for p in args.plot_with]
        print(f"wrote {plot_results([result, *others], args.plot, title=args.plot_title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
