"""Per-lever attribution: one UNet step and one VAE decode, levers added one at a time.

    python -m serve_app.bench.levers --height 512 --width 512 --repeat 2 --json out.json

Levers are applied cumulatively, in place, on one full-size random-weight pipeline, so
each row's gain is measured against the row above it under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

# The timed UNet steps reuse one embeddings tensor, so the K/V cache row shows a step
# after the first (a pipeline call's first step computes K/V as before).
ORDER = ("fuse_attention", "fuse_geglu", "prepack_linear", "channels_last", "prepack_conv",
         "cross_attention_kv_cache")


def _time(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch

    from serve_app.bench.direct import environment, load_pipeline, resolve_dtype
    from serve_app.config import OptimizationConfig
    from serve_app.model.optimize import optimize_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    dtype = getattr(torch, resolve_dtype("auto"))  # what the service picks here
    pipe, label = load_pipeline(args.model, dtype)
    h, w = args.height // 8, args.width // 8
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, h, w, generator=gen, dtype=torch.float32).to(dtype)
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", device="cpu",
                                                  do_classifier_free_guidance=False)
    time_ids = torch.tensor([[args.height, args.width, 0, 0, args.height, args.width]],
                            dtype=dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    scale = pipe.vae.config.scaling_factor

    def unet() -> None:
        with torch.inference_mode():
            pipe.unet(latents, torch.tensor(999), encoder_hidden_states=embeds,
                      added_cond_kwargs=added)

    def vae() -> None:
        with torch.inference_mode():
            pipe.vae.decode(latents / scale)

    rows = []
    enabled: list[str] = []
    for lever in (None, *ORDER):
        if lever is not None:
            enabled.append(lever)
            only = {name: name == lever for name in ORDER}
            options = OptimizationConfig.model_validate({**only, "prompt_cache_size": 0})
            optimize_pipeline(pipe, options)
        unet()  # first call after a change: oneDNN primitive creation, not timed
        vae()
        row = {"levers": list(enabled), "unet_step_s": _time(unet, args.repeat),
               "vae_decode_s": _time(vae, args.repeat)}
        rows.append(row)
        print(f"{'+'.join(enabled) or 'eager':<70} unet/step {row['unet_step_s']:.2f}s  "
              f"vae {row['vae_decode_s']:.2f}s", flush=True)
    result = {"model_label": label, "height": args.height, "width": args.width,
              "repeat": args.repeat, "environment": environment(), "rows": rows}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
