"""SDXL-Turbo's full-size architecture with random weights, for benchmarks.

Model hubs may be unreachable, so speed is measured on the real architecture (same layer
shapes, so the same FLOPs and memory traffic as `stabilityai/sdxl-turbo`) with random
weights. Images are noise, but their difference between code paths is still a valid
measure of numerical drift. Built directly in the target dtype (~7 GB in bfloat16).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from serve_app.model.tiny_model import assemble_sdxl_pipeline

logger = logging.getLogger(__name__)

FULL_MODEL_LABEL = "random weights, full-size architecture"
WEIGHTS_SEED = 0

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)

# CLIP ViT-L/14 text tower, and OpenCLIP ViT-bigG/14 text tower with projection.
TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    hidden_act="quick_gelu", projection_dim=768,
)
TEXT_ENCODER_2_CONFIG: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    hidden_act="gelu", projection_dim=1280,
)


def build_full_pipeline(dtype: Any = None, seed: int = WEIGHTS_SEED):
    """A StableDiffusionXLPipeline of SDXL-Turbo's shapes, random weights, in `dtype`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    from serve_app.model.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE

    dtype = dtype or torch.bfloat16
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    # Parameters are created (and randomly initialised) directly in `dtype`: no float32
    # copy of the ~3.5 B parameters ever exists.
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=MODEL_MAX_LENGTH,
                      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        text_encoder = CLIPTextModel(CLIPTextConfig(**common, **TEXT_ENCODER_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**common, **TEXT_ENCODER_2_CONFIG))
    finally:
        torch.set_default_dtype(previous)
    modules = (unet, vae, text_encoder, text_encoder_2)
    for module in modules:
        module.eval().requires_grad_(False)
    pipe = assemble_sdxl_pipeline(unet, vae, text_encoder, text_encoder_2)
    params = sum(p.numel() for m in modules for p in m.parameters())
    logger.info("full-size SDXL (random weights, %s, %.2f B parameters) built in %.1fs",
                dtype, params / 1e9, time.perf_counter() - started)
    return pipe


def save_random_tiny_vae(target: str | Path, dtype: Any = None) -> Path:
    """AutoencoderTiny (taesdxl's architecture) with random weights: for speed runs only.

    Real use points model.optimization.tiny_vae at a downloaded `madebyollin/taesdxl`.
    """
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(WEIGHTS_SEED)
    vae = AutoencoderTiny(scaling_factor=1.0).to(dtype or torch.bfloat16)
    target = Path(target)
    vae.save_pretrained(target, safe_serialization=True)
    return target


def save_full_model(target: str | Path, dtype: Any = None) -> Path:
    """Write the random-weight full-size model in diffusers format (~7 GB in bfloat16)."""
    target = Path(target)
    build_full_pipeline(dtype).save_pretrained(target, safe_serialization=True)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="directory to write the model to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(save_full_model(args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
