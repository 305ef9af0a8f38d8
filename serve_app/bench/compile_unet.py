"""UNet-only: a torch.compile variant against eager and against the default levers.

    python -m serve_app.bench.compile_unet --variant inductor-freezing --size 512

One variant per process (inductor settings are process-wide): eager steps first, then
`torch._dynamo.explain` (graph breaks), then the compiled UNet: one call to compile, one at
another timestep (must not recompile), then the timed steps. Prints one JSON line.
Variants: levers (no compile), inductor, inductor-freezing, inductor-freezing-cpp_wrapper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

VARIANTS = ("levers", "inductor", "inductor-freezing", "inductor-freezing-cpp_wrapper")


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch import nn

    from serve_app.bench.direct import load_pipeline, resolve_dtype
    from serve_app.config import OptimizationConfig
    from serve_app.model.optimize import optimize_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--model", default="full")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    dtype = getattr(torch, resolve_dtype("auto"))  # what the service picks here
    pipe, label = load_pipeline(args.model, dtype)
    size = args.size
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt("a cat", device="cpu",
                                                  do_classifier_free_guidance=False)
    latents = torch.randn(1, 4, size // 8, size // 8,
                          generator=torch.Generator().manual_seed(0)).to(dtype)
    added = {"text_embeds": pooled,
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype)}
    unet = pipe.unet
    del pipe

    def step(model: Any, timestep: int = 999) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            started = time.perf_counter()
            out = model(latents, torch.tensor(timestep), encoder_hidden_states=embeds,
                        added_cond_kwargs=added).sample
            return time.perf_counter() - started, out

    step(unet)  # warm-up: oneDNN primitives
    eager_times = [step(unet)[0] for _ in range(args.repeat)]
    _, reference = step(unet)
    result: dict[str, Any] = {"variant": args.variant, "model_label": label, "size": size,
                              "eager_step_s": statistics.median(eager_times)}
    if args.variant == "levers":
        holder = SimpleNamespace(unet=unet, vae=nn.Identity(), text_encoder=None,
                                 text_encoder_2=None)
        optimize_pipeline(holder, OptimizationConfig(prompt_cache_size=0))
        model = holder.unet
        step(model)
    else:
        import torch._dynamo
        import torch._inductor.config as inductor_config

        inductor_config.freezing = "freezing" in args.variant
        inductor_config.cpp_wrapper = "cpp_wrapper" in args.variant
        unet = unet.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            explained = torch._dynamo.explain(unet)(
                latents, torch.tensor(999), encoder_hidden_states=embeds,
                added_cond_kwargs=added)
        result["graph_breaks"] = explained.graph_break_count
        result["graphs"] = explained.graph_count
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = torch.compile(unet)
        started = time.perf_counter()
        step(model)
        result["compile_and_first_call_s"] = time.perf_counter() - started
        step(model, 500)
        result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    times = [step(model, 999 - 250 * (i % 4))[0] for i in range(args.repeat)]
    _, out = step(model)
    result["step_s"] = statistics.median(times)
    result["steps_s"] = times
    result["speedup_vs_eager"] = result["eager_step_s"] / result["step_s"]
    difference = (out.float() - reference.float()).abs()
    result["max_abs_diff_vs_eager"] = difference.max().item()
    result["mean_abs_diff_vs_eager"] = difference.mean().item()
    print(json.dumps(result), flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
