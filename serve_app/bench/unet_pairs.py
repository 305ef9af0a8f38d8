"""UNet-only: one denoising step, eager vs all default levers, alternating E,O / O,E.

    python -m serve_app.bench.unet_pairs --size 1024 --repeat 3

Full-size random-weight UNet and an optimised deep copy side by side (~11 GB).
"""

from __future__ import annotations

import argparse
import copy
import time
from types import SimpleNamespace


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch import nn

    from serve_app.bench.direct import resolve_dtype
    from serve_app.bench.full_model import build_full_pipeline
    from serve_app.config import OptimizationConfig
    from serve_app.model.optimize import optimize_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    size = args.size
    dtype = getattr(torch, resolve_dtype("auto"))  # what the service picks here
    pipe = build_full_pipeline(dtype)
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt("a cat", device="cpu",
                                                  do_classifier_free_guidance=False)
    latents = torch.randn(1, 4, size // 8, size // 8).to(dtype)
    added = {"text_embeds": pooled,
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype)}
    eager = pipe.unet
    del pipe
    holder = SimpleNamespace(unet=copy.deepcopy(eager), vae=nn.Identity(), text_encoder=None,
                             text_encoder_2=None)
    optimize_pipeline(holder, OptimizationConfig(prompt_cache_size=0))
    unets = {"eager": eager, "optimized": holder.unet}

    def step(unet: nn.Module) -> tuple[float, float]:
        with torch.inference_mode():
            started, cpu = time.perf_counter(), time.process_time()
            unet(latents, torch.tensor(999), encoder_hidden_states=embeds,
                 added_cond_kwargs=added)
            return time.perf_counter() - started, time.process_time() - cpu

    for unet in unets.values():
        step(unet)  # warm-up
    for i in range(args.repeat):
        for name in (("eager", "optimized") if i % 2 == 0 else ("optimized", "eager")):
            wall, cpu = step(unets[name])
            print(f"{i} {name:<9} unet step {wall:.2f}s cpu {cpu:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
