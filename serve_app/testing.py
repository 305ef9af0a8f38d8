"""A fake generator for tests of HTTP, batching and errors without diffusers.

It lives in the package (not tests/) so Ray replicas can import it by path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from serve_app.protocol import GenerationItem

FAIL_PROMPT = "__fail__"
# Takes SLOW_PROMPT_S: keeps a replica busy while a test does something else.
SLOW_PROMPT = "__slow__"
SLOW_PROMPT_S = 3.0


class FakeGenerator:
    def __init__(self, delay_s: float = 0.0, load_s: float = 0.0,
                 executions_log: str | None = None, prompts_log: str | None = None) -> None:
        # load_s: how long "loading the model" takes, as a real replica's start-up does.
        time.sleep(load_s)
        self.delay_s = delay_s
        # executions_log: a file that gets one line per finished call, its progress key
        # (a job's id): tests count how often each job really ran.
        self.executions_log = executions_log
        # prompts_log: a file that gets each call's prompt, in the order the calls ran: the
        # tests' view of what the model ran (the real replica keeps no prompts).
        self.prompts_log = prompts_log
        self.info: dict[str, Any] = {
            "model": "fake", "backend": "fake", "dtype": "uint8", "device": "cpu",
            "threads": 1,
        }

    def generate(self, items: Sequence[GenerationItem],
                 on_step: Callable[[int], None] | None = None,
                 on_preview: Callable[[int, list[np.ndarray]], None] | None = None,
                 init_images: Sequence[np.ndarray] | None = None) -> list[list[np.ndarray]]:
        if any(item.prompt == FAIL_PROMPT for item in items):
            raise RuntimeError("fake generator failure (internal detail that must not leak)")
        if any(item.prompt == SLOW_PROMPT for item in items):
            time.sleep(SLOW_PROMPT_S)
        steps = items[0].denoising_steps
        images_in_call = sum(item.count for item in items)
        for step in range(1, steps + 1):
            if self.delay_s:
                time.sleep(self.delay_s / steps)
            if on_preview is not None:
                # A flat grey that brightens with each step: tests can tell previews apart.
                level = min(255, 32 * step)
                on_preview(step, [np.full((item.height // 8, item.width // 8, 3), level,
                                          np.uint8) for item in items
                                  for _ in range(item.count)][:images_in_call])
            if on_step is not None:
                on_step(step)
        out = []
        for index, item in enumerate(items):
            images = []
            for seed in item.image_seeds():
                rng = np.random.default_rng(seed)
                noise = rng.integers(0, 256, (item.height, item.width, 3), dtype=np.uint8)
                if init_images is not None:
                    # Image-to-image: the input shows through where strength leaves it.
                    keep = 1.0 - item.strength
                    noise = (init_images[index] * keep + noise * item.strength).astype(np.uint8)
                images.append(noise)
            out.append(images)
        if self.executions_log:
            # One write per batch, O_APPEND: whole lines even with several replicas.
            lines = "".join(f"{item.progress_key or '-'}\n" for item in items)
            with open(self.executions_log, "a", encoding="utf-8") as log:
                log.write(lines)
        if self.prompts_log:
            with open(self.prompts_log, "a", encoding="utf-8") as log:
                log.write("".join(f"{item.prompt}\n" for item in items))
        return out


def load_fake_generator(config: Any) -> FakeGenerator:
    options = dict(config.model.generator_options)
    # loads_log: a file that gets one line per model load, the model's id: tests count
    # loads (and where several model replicas run, which replica loaded what).
    loads_log = options.pop("loads_log", None)
    if loads_log:
        with open(loads_log, "a", encoding="utf-8") as log:
            log.write(f"{config.model.id}\n")
    # A model whose adapter file is missing fails its load, as with the real loader
    # (serve_app/model/lora.py, which this module may not import), instead of running
    # without it.
    for lora in config.model.loras:
        path = os.path.expanduser(lora.source)
        if lora.source.startswith(("/", "./", "../", "~")) and not os.path.exists(path):
            raise FileNotFoundError(f"LoRA source {lora.source!r}: no such file or directory")
    generator = FakeGenerator(**options)
    # The profile as configured (the fake has no parts of its own to pick).
    generator.info.update(profile=config.model.profile, parts={"unet": "fake", "vae": "fake"})
    return generator


def tee_present() -> str:
    return "tdx"


def tee_absent() -> None:
    return None
