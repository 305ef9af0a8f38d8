"""UNet attention for CPU (levers fuse_attention, cross_attention_kv_cache): fused
self-attention q/k/v, and cross-attention K/V computed once per pipeline call."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model.optimize.packed import PackedLinear

# diffusers' Attention: its attributes (heads, to_q, to_out, norms, our cpu_qkv) are only
# known at run time, so they are not type-checked.
AttentionModule = Any


class CpuAttnProcessor:
    """AttnProcessor2_0 for plain UNet attention: fused QKV, no no-op rescale pass.

    Anything it does not handle (masks, norms, 4-D input, residuals) goes to the stock
    processor, so behaviour is unchanged outside the fast path.
    """

    def __init__(self, cache_cross_kv: bool = False) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()
        self.cache_cross_kv = cache_cross_kv
        # (weakref to the encoder_hidden_states tensor, k, v): the prompt embeddings are the
        # same tensor at every denoising step, so their K/V projections are computed once
        # per pipeline call. Dropped when that tensor is freed.
        self._cross_kv: tuple[weakref.ref, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def handles(attn: AttentionModule) -> bool:
        return (attn.spatial_norm is None and attn.group_norm is None
                and attn.norm_q is None and attn.norm_k is None
                and not attn.residual_connection and not attn.is_cross_attention
                and isinstance(attn.to_q, nn.Linear | PackedLinear))

    def __call__(self, attn: AttentionModule, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        qkv = getattr(attn, "cpu_qkv", None)
        if (attention_mask is not None or hidden_states.ndim != 3 or args
                or (encoder_hidden_states is not None and qkv is not None)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        batch, length, _ = hidden_states.shape
        heads = attn.heads
        if qkv is not None:
            q, k, v = qkv(hidden_states).view(batch, length, 3, heads, -1).permute(
                2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.to_q(hidden_states).view(batch, length, heads, -1).transpose(1, 2)
            k, v = self._key_value(attn, hidden_states, encoder_hidden_states, batch)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out

    def _key_value(self, attn: AttentionModule, hidden_states: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None,
                   batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cross_kv
        if (encoder_hidden_states is not None and cached is not None
                and cached[0]() is encoder_hidden_states):
            return cached[1], cached[2]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        heads, length = attn.heads, context.shape[1]
        k = attn.to_k(context).view(batch, length, heads, -1).transpose(1, 2)
        v = attn.to_v(context).view(batch, length, heads, -1).transpose(1, 2)
        if self.cache_cross_kv and encoder_hidden_states is not None:
            self._cross_kv = (weakref.ref(encoder_hidden_states, self._forget), k, v)
        return k, v

    def _forget(self, ref: weakref.ref) -> None:
        if self._cross_kv is not None and self._cross_kv[0] is ref:
            self._cross_kv = None


def _attention_modules(module: nn.Module) -> Iterator[AttentionModule]:
    from diffusers.models.attention_processor import Attention

    for sub in module.modules():
        if isinstance(sub, Attention):
            yield sub


class _FusedSlice(nn.Module):
    """One of q/k/v, computed by the attention's fused QKV GEMM (fallback path only)."""

    attn: AttentionModule

    def __init__(self, attn: AttentionModule, start: int, size: int, in_features: int) -> None:
        super().__init__()
        self.__dict__["attn"] = attn  # not a submodule: no cycle in .modules()
        self.start, self.out_features, self.in_features = start, size, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.cpu_qkv(x)[..., self.start:self.start + self.out_features]


def fuse_attention(unet: nn.Module, *, fuse_qkv: bool = True,
                   cache_cross_kv: bool = False) -> int:
    """Install CpuAttnProcessor on the UNet's attention; fuse q/k/v of self-attention."""
    count = 0
    for attn in _attention_modules(unet):
        processor = CpuAttnProcessor(cache_cross_kv=cache_cross_kv)
        if fuse_qkv and CpuAttnProcessor.handles(attn):
            if isinstance(attn.to_q, nn.Linear) and all(
                    isinstance(getattr(attn, n), nn.Linear) for n in ("to_k", "to_v")):
                layers = (attn.to_q, attn.to_k, attn.to_v)
                weight = torch.cat([lin.weight.detach() for lin in layers])
                bias = (None if attn.to_q.bias is None
                        else torch.cat([lin.bias.detach() for lin in layers]))
                fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                  dtype=weight.dtype, device=weight.device)
                with torch.no_grad():
                    fused.weight.copy_(weight)
                    if bias is not None:
                        fused.bias.copy_(bias)
                fused.requires_grad_(False)
                attn.cpu_qkv = fused
                # q/k/v stay callable (stock processor fallback) as slices of the fused
                # GEMM, so their weights are not held twice.
                size = attn.to_q.out_features
                attn.to_q, attn.to_k, attn.to_v = (
                    _FusedSlice(attn, i * size, size, weight.shape[1]) for i in range(3))
        attn.set_processor(processor)
        count += 1
    return count
