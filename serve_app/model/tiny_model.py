"""The embedded default model: SDXL's architecture at toy size, random weights.

It is generated offline with a fixed seed and saved in diffusers format, then loaded by
the same `from_pretrained` path as `stabilityai/sdxl-turbo`. Same classes: a UNet with
`text_time` added conditioning, CLIPTextModel + CLIPTextModelWithProjection, AutoencoderKL
with an 8x latent scale, Euler-ancestral with trailing timestep spacing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_MODEL_VERSION = "v1"
WEIGHTS_SEED = 0
# The embedded models by name (`embedded:<name>`): the same architecture, weights from
# another seed, so the same prompt and seed give other images (the quick start's second
# model). Each is generated once into the cache, under its name and TINY_MODEL_VERSION.
TINY_MODEL_SEEDS = {"tiny-sdxl": WEIGHTS_SEED, "tiny-sdxl-b": 1}

# sdxl-turbo's scheduler_config.json
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def default_cache_dir() -> Path:
    base = os.environ.get("SDXL_SERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sdxl-turbo-serve")
    return Path(base)


def build_tiny_pipeline(seed: int = WEIGHTS_SEED):
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

    torch.manual_seed(seed)
    text_dim, proj_dim, time_dim = 32, 32, 8
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * text_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.13025,
    )
    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=text_dim, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu", projection_dim=proj_dim, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common))
    return assemble_sdxl_pipeline(unet, vae, text_encoder, text_encoder_2)


def assemble_sdxl_pipeline(unet, vae, text_encoder, text_encoder_2):
    """An SDXL pipeline from its networks, with sdxl-turbo's offline tokenizers (the second
    pads with "!") and its Euler-ancestral scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from serve_app.model.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "t1"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(
            write_clip_tokenizer(Path(tmp) / "t2", pad_token="!"))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def ensure_tiny_model(cache_dir: str | Path | None = None, name: str = "tiny-sdxl") -> Path:
    """Return the directory of the embedded tiny model `name` (TINY_MODEL_SEEDS),
    generating it once (atomically)."""
    seed = TINY_MODEL_SEEDS[name]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"{name}-{TINY_MODEL_VERSION}"
    if (target / "model_index.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("generating the embedded tiny SDXL model %s in %s", name, target)
    # Several replicas may start at once: each writes its own copy and renames it in.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


TINY_VAE_VERSION = "v1"


def build_tiny_vae():
    """AutoencoderTiny (taesdxl's classes: 4 latent channels, 8x scale) at toy size."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(WEIGHTS_SEED)
    return AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16),
                           decoder_block_out_channels=(16, 16, 16, 16),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                           scaling_factor=1.0)


def ensure_tiny_vae(cache_dir: str | Path | None = None) -> Path:
    """The embedded tiny VAE's directory (`embedded:tiny-taesd`), generated once."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"tiny-taesd-{TINY_VAE_VERSION}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("generating the embedded tiny VAE in %s", target)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-taesd-", dir=root))
    try:
        build_tiny_vae().save_pretrained(staging, safe_serialization=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
