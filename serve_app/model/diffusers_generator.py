"""The diffusers generator both backends run (torch here, OpenVINO through
serve_app.model.openvino.runtime); the dtype follows the CPU (model/cpu.py). Loading it is
serve_app.model.pipeline's (load_generator)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from serve_app.config import parse_size
from serve_app.model import cpu
from serve_app.model.generator import PreviewCallback
from serve_app.protocol import GenerationItem, flatten_group, split_images

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# SDXL latents -> RGB, a linear projection (the coefficients ComfyUI fits for its SDXL
# latent previews): a 64x64 preview of a 512x512 image for a 4x3 matrix product per
# latent pixel, instead of a VAE decode. A rough picture of where the image is going.
LATENT_RGB_FACTORS = torch.tensor([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
])
LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


def latent_previews(latents: torch.Tensor) -> list[np.ndarray]:
    """(B, 4, h, w) latents -> B small (h, w, 3) uint8 previews."""
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), LATENT_RGB_FACTORS) + LATENT_RGB_BIAS
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(pixels.cpu().numpy())


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
        self.info.setdefault("img2img", True)
        # Why image-to-image cannot run on this backend (None: it can).
        self.img2img_unavailable: str | None = None
        self._img2img: Any = None

    def img2img_pipeline(self) -> Any:
        """diffusers' SDXL image-to-image pipeline over the same modules (from_pipe shares
        them: no second copy of the weights), with the same prompt-embedding cache."""
        if self._img2img is None:
            from diffusers import StableDiffusionXLImg2ImgPipeline

            # dtype: from_pipe casts the shared modules to it (float32 when not given),
            # which would undo bfloat16 under the running text-to-image pipeline.
            # vae passed on: from_pipe drops a module whose class is not the type hint's
            # (an AutoencoderTiny, model.vae tiny).
            img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.pipe, vae=self.pipe.vae,
                                                                 dtype=self.dtype)
            img2img.set_progress_bar_config(disable=True)
            if "encode_prompt" in vars(self.pipe):  # the prompt_cache lever's LRU
                img2img.encode_prompt = self.pipe.encode_prompt
            self._img2img = img2img
        return self._img2img

    def generate(self, items: Sequence[GenerationItem],
                 on_step: Callable[[int], None] | None = None,
                 on_preview: PreviewCallback | None = None,
                 init_images: Sequence[np.ndarray] | None = None) -> list[list[np.ndarray]]:
        first = items[0]
        if any(item.batch_key != first.batch_key for item in items):
            raise ValueError("generate() takes items of one kind and shape; group them first")
        prompts, seeds = flatten_group(items)
        # One generator per image, so an image depends on its seed, not on its batch-mates.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        step_callback = None
        if on_step is not None or on_preview is not None:
            def step_callback(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
                if on_preview is not None:
                    on_preview(index + 1, latent_previews(tensors["latents"]))
                if on_step is not None:
                    on_step(index + 1)
                return tensors
        call: dict[str, Any] = {
            "prompt": prompts,
            "num_inference_steps": first.steps,
            "guidance_scale": 0.0,  # SDXL-Turbo is trained without classifier-free guidance
            "generator": generators,
            "output_type": "pt",
            "callback_on_step_end": step_callback,
        }
        if first.kind == "img2img":
            if self.img2img_unavailable is not None:
                raise NotImplementedError(self.img2img_unavailable)
            if init_images is None or len(init_images) != len(items):
                raise ValueError("image-to-image items need one input image each")
            per_image = [pixels for item, pixels in zip(items, init_images)
                         for _ in range(item.count)]
            batch = torch.from_numpy(np.stack(per_image)).permute(0, 3, 1, 2)
            pipe = self.img2img_pipeline()
            # The inputs are already fitted to the item's size, which the output then takes.
            call.update(image=batch.float() / 255.0, strength=first.strength)
        else:
            pipe = self.pipe
            call.update(width=first.width, height=first.height)
        with torch.inference_mode():
            images = pipe(**call).images
        return split_images(items, list(_to_uint8(images)))

    def warmup(self, sizes: Sequence[str]) -> None:
        for size in sizes:
            width, height = parse_size(size)
            start = time.perf_counter()
            # One step: the first call at a size pays its one-off costs (OpenVINO's
            # primitives for the shape, allocations) in the text encoders, the UNet and the
            # VAE decode alike; a second step repeats the UNet's cost and warms nothing more
            # (a full-size float32 UNet step: about 10 s on 2 vCPUs, BENCHMARKS.md).
            self.generate([GenerationItem("warm-up", width, height, steps=1, seed=0)])
            logger.info("warm-up %s: %.2fs", size, time.perf_counter() - start)


def device_and_dtype(num_gpus: float, requested: str,
                     caps: cpu.CpuCapabilities | None = None) -> tuple[str, cpu.DtypeChoice]:
    """A replica given a GPU runs on CUDA (float16 for `auto`); on CPU the dtype follows
    the CPU's bf16 support (serve_app.model.cpu.choose_dtype), and float16 is refused."""
    device = "cuda" if num_gpus > 0 else "cpu"
    return device, cpu.choose_dtype(requested, device, cpu.host() if caps is None else caps)


def profile_info(model_cfg: Any, *, unet: str, vae_source: str | None) -> dict[str, Any]:
    """What /readyz and the playground show: model.profile and the parts that run
    (`unet`: the UNet's weights, e.g. "int8" or the dtype; `vae_source`: the tiny VAE's
    source, None for the full VAE)."""
    return {"profile": model_cfg.profile,
            "parts": {"unet": unet,
                      "vae": "full" if vae_source is None else f"tiny ({vae_source})"}}
