"""Single networks of the pipeline, timed alone at full size (no 7 GB model needed):

* ``vae``: the decode of a 512x512 image (a 64x64 latent): SDXL's full VAE decoder against
  the tiny VAE (AutoencoderTiny at taesdxl's size), each in torch eager and as OpenVINO IR,
  at float32, random weights (seeded), runs alternating between the variants.
* ``dq``: one of the UNet's transformer blocks (SDXL's 1280-channel block at 512x512: 256
  tokens, cross-attention over 77 x 2048; 60 of the UNet's 70 transformer blocks are at this
  width) as OpenVINO IR: float32 weights, int8 weights, and int8
  weights with dynamic activation quantization at several group sizes.

* ``unet``: one UNet step at 512x512, torch eager float32 against an exported OpenVINO IR
  (`--model DIR --ir IR_DIR`), per dynamic-quantization group.

`python -m serve_app.bench.parts vae|dq|unet --repeat N --threads T`; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _median_times(fns: dict[str, Callable[[], Any]], repeat: int,
                  first: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each fn once untimed (its output kept in `first`), then `repeat` rounds of every fn
    in turn (alternating)."""
    for name, fn in fns.items():
        out = fn()
        if first is not None:
            first[name] = out
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "runs": len(t)} for name, t in times.items()}


def _compile(core: Any, model: Any, threads: int, **extra: Any) -> Any:
    return core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "f32", **extra})


def bench_vae(repeat: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from serve_app.bench.full_model import VAE_CONFIG

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    full = AutoencoderKL(**VAE_CONFIG).eval()
    tiny = AutoencoderTiny(scaling_factor=1.0).eval()
    latents = torch.randn(1, 4, 64, 64)

    class Decode(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, x):
            return self.vae.decode(x, return_dict=False)[0]

    core = ov.Core()
    with torch.no_grad():
        ov_full = _compile(core, ov.convert_model(Decode(full), example_input=(latents,)),
                           threads)
        ov_tiny = _compile(core, ov.convert_model(Decode(tiny), example_input=(latents,)),
                           threads)
    array = latents.numpy()

    def eager(vae: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return vae.decode(latents, return_dict=False)[0]
        return run

    first: dict[str, Any] = {}
    result = _median_times({"torch-full": eager(full), "torch-tiny": eager(tiny),
                            "openvino-full": lambda: ov_full(array)[0],
                            "openvino-tiny": lambda: ov_tiny(array)[0]}, repeat, first)
    outputs = {name: np.asarray(out) for name, out in first.items()}
    drift = {f"openvino-{vae}": float(np.abs(outputs[f"openvino-{vae}"]
                                             - outputs[f"torch-{vae}"]).max())
             for vae in ("full", "tiny")}
    return {"mode": "vae", "latent": [1, 4, 64, 64], "threads": threads, "repeat": repeat,
            "params_m": {"full": sum(p.numel() for p in full.parameters()) / 1e6,
                         "tiny": sum(p.numel() for p in tiny.parameters()) / 1e6},
            "times": result, "max_abs_diff_vs_torch_float32": drift}


def bench_dq(repeat: int, threads: int, groups: list[int]) -> dict[str, Any]:
    import nncf
    import numpy as np
    import openvino as ov
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = BasicTransformerBlock(1280, 20, 64, cross_attention_dim=2048).eval()
    hidden, context = torch.randn(1, 256, 1280), torch.randn(1, 77, 2048)

    class Block(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x, c):
            return self.inner(x, encoder_hidden_states=c)

    with torch.no_grad():
        reference = Block(block)(hidden, context).numpy()
        model = ov.convert_model(Block(block), example_input=(hidden, context))
    core = ov.Core()
    variants = {"f32": _compile(core, model, threads)}
    int8 = nncf.compress_weights(model.clone())
    for group in groups:
        variants[f"int8-dq{group}"] = _compile(core, int8, threads,
                                               DYNAMIC_QUANTIZATION_GROUP_SIZE=group)
    inputs = [hidden.numpy(), context.numpy()]
    drift = {name: float(np.abs(compiled(inputs)[0] - reference).mean())
             for name, compiled in variants.items()}
    read_back = {name: int(c.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))
                 for name, c in variants.items()}
    def runner(compiled: Any) -> Callable[[], Any]:
        return lambda: compiled(inputs)

    result = _median_times({name: runner(c) for name, c in variants.items()}, repeat)
    return {"mode": "dq", "block": "BasicTransformerBlock(1280, 20 heads, cross 2048), "
                                   "256 tokens", "threads": threads, "repeat": repeat,
            "times": result, "mean_abs_diff_vs_torch_float32": drift,
            "group_read_back": read_back}


def bench_unet(repeat: int, threads: int, model_dir: str, ir_dir: str,
               groups: list[int]) -> dict[str, Any]:
    """One UNet step at 512x512 (64x64 latent, batch 1): torch eager float32 from
    `model_dir` against the OpenVINO IR in `ir_dir` (its unet.xml, e.g. int8 weights),
    compiled once per group (0: dynamic quantization off), one compiled model at a time;
    each variant alternates with torch, so every ratio is paired."""
    import gc
    import resource

    import numpy as np
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet",
                                                dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 64, 64, generator=generator)
    context = torch.randn(1, 77, 2048, generator=generator)
    pooled = torch.randn(1, 1280, generator=generator)
    time_ids = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]])
    step = torch.tensor([999.0])

    def eager() -> Any:
        with torch.inference_mode():
            return unet(sample, step, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                        return_dict=False)[0]

    reference = eager().numpy()
    inputs = [a.numpy() for a in (sample, step, context, pooled, time_ids)]
    core = ov.Core()
    variants: dict[str, Any] = {}
    for group in groups:
        compiled = _compile(core, str(Path(ir_dir) / "unet.xml"), threads,
                            DYNAMIC_QUANTIZATION_GROUP_SIZE=group)
        out = compiled(inputs)[0]
        def run(c: Any = compiled) -> Any:
            return c(inputs)

        variants[f"dq{group}"] = {
            "times": _median_times({"torch-eager-f32": eager, f"openvino-dq{group}": run},
                                   repeat),
            "mean_abs_diff_vs_torch_float32": float(np.abs(out - reference).mean()),
            "reference_mean_abs": float(np.abs(reference).mean())}
        del compiled
        gc.collect()
    return {"mode": "unet", "model": model_dir, "ir": ir_dir, "threads": threads,
            "repeat": repeat, "latent": [1, 4, 64, 64], "variants": variants,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("vae", "dq", "unet"))
    parser.add_argument("--model", help="unet: the diffusers directory (full-size model)")
    parser.add_argument("--ir", help="unet: the OpenVINO IR directory holding unet.xml")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--groups", default="0,32,256,1024",
                        help="dq: DYNAMIC_QUANTIZATION_GROUP_SIZE values (0: off)")
    args = parser.parse_args(argv)
    from serve_app.bench.direct import environment

    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    if args.mode == "vae":
        result = bench_vae(args.repeat, args.threads)
    elif args.mode == "unet":
        if not (args.model and args.ir):
            raise SystemExit("unet needs --model DIR and --ir IR_DIR")
        result = bench_unet(args.repeat, args.threads, args.model, args.ir, groups)
    else:
        result = bench_dq(args.repeat, args.threads, groups)
    result["environment"] = environment()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
