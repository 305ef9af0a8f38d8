"""CPU speed levers applied after load. Each is switched by model.optimization.

All of them keep diffusers' pipeline and only swap modules or attention processors:

* ``prepack_linear``: nn.Linear -> :class:`PackedLinear`, whose weight is reordered once
  into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``) and run by
  ``mkldnn._linear_pointwise``, instead of being re-laid-out on every F.linear call.
* ``prepack_conv``: nn.Conv2d -> :class:`PackedConv2d` (``mkldnn_reorder_conv2d_weight`` +
  ``mkldnn._convolution_pointwise``), channels-last activations.
* ``fuse_geglu``: the feed-forward GEGLU's projection becomes two prepacked GEMMs, the gate
  with GELU fused into the GEMM and the value GEMM multiplied by it in its epilogue: no
  chunk copy, no separate GELU and multiply passes over the 4x-wide activation.
* ``fuse_attention``: self-attention's q/k/v projections become one GEMM, and the no-op
  ``/ rescale_output_factor`` (1.0) pass over every attention output is skipped.
* ``cross_attention_kv_cache``: cross-attention's K/V projections of the prompt
  embeddings are computed at the first denoising step and reused at the others (the same
  tensor, so the same values, bit for bit).
* ``int8_unet`` (model.torch_int8, not an OptimizationConfig lever: it changes the
  images): the UNet's linear and convolution layers as int8 x int8 oneDNN kernels with
  per-call input quantization (:mod:`serve_app.model.optimize.int8`). Applied after the
  attention fusion (its fused q/k/v GEMM is quantized too) and before fuse_geglu and the
  prepacking, which then leave the UNet's int8 layers alone.
* ``channels_last``: UNet and VAE in channels-last memory format.
* ``prompt_cache_size``: LRU cache of prompt embeddings; a repeated prompt skips both text
  encoders. 0 turns it off.
* the tiny VAE is not a lever: it is ``model.vae: tiny`` (serve_app/model/tiny_vae.py);
  the benchmark's ``tiny_vae`` argument swaps one in before the levers.

The packed ops are oneDNN kernels of the same arithmetic (bf16 or fp32 inputs, fp32
accumulation), so images match eager at the same dtype within the tolerance measured in
BENCHMARKS.md and asserted in tests/optimize. oneDNN's bf16 kernels need AVX-512 (or
avx_ne_convert): on other CPUs a bf16 pipeline skips the oneDNN levers, with the reason
reported; a float32 pipeline (model.dtype auto there) has them on every x86 CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.config import OptimizationConfig
from serve_app.model import cpu
from serve_app.model.optimize.attention import CpuAttnProcessor, fuse_attention
from serve_app.model.optimize.int8 import int8_unusable, is_int8, quantize_int8
from serve_app.model.optimize.int8_cache import Int8Tensors
from serve_app.model.optimize.packed import (
    FusedGEGLU,
    PackedConv2d,
    PackedLinear,
    fuse_geglus,
    mkldnn_available,
    onednn_bf16_supported,
    prepack_convs,
    prepack_linears,
)
from serve_app.model.optimize.prompt_cache import PromptEmbeddingCache

__all__ = ["COMPONENTS", "CpuAttnProcessor", "FusedGEGLU", "LeverReport", "PackedConv2d",
           "PackedLinear", "PromptEmbeddingCache", "fuse_attention", "fuse_geglus",
           "mkldnn_available", "onednn_bf16_supported", "optimize_pipeline",
           "prepack_convs", "prepack_linears"]

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class LeverReport:
    """What optimize_pipeline did: levers applied, in order, and those switched on but not
    applied, with the reason (logged at start-up, reported by /readyz)."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# Levers that run oneDNN's packed kernels.
ONEDNN_LEVERS = ("fuse_geglu", "prepack_linear", "prepack_conv")


def _onednn_unusable(pipe: Any) -> str | None:
    """Why the oneDNN levers cannot run on this pipeline, or None when they can."""
    if not mkldnn_available():
        return "oneDNN (mkldnn) ops unavailable in this torch build"
    unet = getattr(pipe, "unet", None)
    dtype = getattr(unet, "dtype", None)
    if dtype == torch.bfloat16 and not onednn_bf16_supported():
        return (f"oneDNN bf16 kernels need avx512bw/vl/dq or avx_ne_convert; CPU is "
                f"{cpu.host().describe()} (float32 has them everywhere: model.dtype auto)")
    return None


def optimize_pipeline(pipe: Any, options: OptimizationConfig, *, backend: str = "torch",
                      tiny_vae: str | None = None, int8_unet: bool = False,
                      int8_sink: Int8Tensors | None = None) -> LeverReport:
    """Apply the switched-on levers to a CPU pipeline in place.

    With backend "ipex", IPEX prepacks and fuses the weights itself (ipex.optimize after
    this), so only channels_last, the tiny VAE and the prompt cache are applied here.
    `tiny_vae`: a directory of an AutoencoderTiny to decode with (the benchmark's switch;
    a replica loads it by model.vae before the levers). `int8_unet`: the UNet's layers in
    int8 (model.torch_int8, resolved by the caller); reported as applied or skipped; a UNet
    read from the int8 cache is int8 already. `int8_sink` collects what the cache stores.
    """
    report = LeverReport()
    applied = report.applied
    if backend == "ipex":
        options = options.model_copy(update={"prepack_linear": False, "prepack_conv": False,
                                             "fuse_geglu": False, "fuse_attention": False,
                                             "cross_attention_kv_cache": False})
    if tiny_vae:
        from serve_app.model.tiny_vae import load_tiny_vae

        pipe.vae = load_tiny_vae(tiny_vae, pipe.unet.dtype)
        applied.append("tiny_vae")
    blocked = _onednn_unusable(pipe)
    if blocked is not None:
        for name in ONEDNN_LEVERS:
            if getattr(options, name):
                report.skipped[name] = blocked
        if report.skipped:
            logger.warning("skipping %s: %s", ", ".join(report.skipped), blocked)
    onednn = blocked is None
    cache_kv = getattr(options, "cross_attention_kv_cache", False)
    if (options.fuse_attention or cache_kv) and getattr(pipe, "unet", None) is not None:
        if fuse_attention(pipe.unet, fuse_qkv=options.fuse_attention, cache_cross_kv=cache_kv):
            applied.extend(name for name, on in (("fuse_attention", options.fuse_attention),
                                                 ("cross_attention_kv_cache", cache_kv)) if on)
    if int8_unet:
        why_not = ("IPEX optimizes the UNet itself" if backend == "ipex" else int8_unusable())
        if why_not is not None:
            report.skipped["int8_unet"] = why_not
            logger.warning("skipping int8_unet: %s", why_not)
        elif is_int8(pipe.unet):
            applied.append("int8_unet")
        elif quantize_int8(pipe.unet, sink=None if int8_sink is None else int8_sink.int8):
            applied.append("int8_unet")
            if int8_sink is not None:  # the float tensors left, before any later lever
                int8_sink.floats.update(pipe.unet.state_dict())
    if options.fuse_geglu and onednn and fuse_geglus(pipe.unet):
        applied.append("fuse_geglu")
    if options.prepack_linear and onednn:
        count = sum(prepack_linears(getattr(pipe, name)) for name in COMPONENTS
                    if getattr(pipe, name, None) is not None)
        if count:
            applied.append("prepack_linear")
    if options.channels_last:
        for name in ("unet", "vae"):
            getattr(pipe, name).to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if options.prepack_conv and onednn:
        count = sum(prepack_convs(getattr(pipe, name)) for name in ("unet", "vae"))
        if count:
            applied.append("prepack_conv")
    if options.prompt_cache_size > 0 and not isinstance(
            getattr(pipe, "encode_prompt", None), PromptEmbeddingCache):
        pipe.encode_prompt = PromptEmbeddingCache(pipe.encode_prompt, options.prompt_cache_size)
        applied.append("prompt_cache")
    return report
