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
* ``channels_last``: UNet and VAE in channels-last memory format.
* ``prompt_cache_size``: LRU cache of prompt embeddings; a repeated prompt skips both text
  encoders. 0 turns it off.
* ``tiny_vae``: opt-in: decode with AutoencoderTiny loaded from a local directory (a speed
  versus quality trade, off by default).

The packed ops are oneDNN kernels of the same arithmetic (bf16 or fp32 inputs, fp32
accumulation), so images match eager at the same dtype within the tolerance measured in
BENCHMARKS.md and asserted in tests/optimize. oneDNN's bf16 kernels need AVX-512 (or
avx_ne_convert): on other CPUs a bf16 pipeline skips the oneDNN levers, with the reason
reported; a float32 pipeline (model.dtype auto there) has them on every x86 CPU.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from serve_app import cpu
from serve_app.config import OptimizationConfig

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def mkldnn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def onednn_bf16_supported(caps: cpu.CpuCapabilities | None = None) -> bool:
    """oneDNN's bf16 kernels run here: both this CPU (as detected, or capped by
    SDXL_SERVE_CPU_CLASS) and torch's own check agree."""
    caps = cpu.host() if caps is None else caps
    return caps.onednn_bf16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packable(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return False
    return weight.dtype != torch.bfloat16 or onednn_bf16_supported()


class PackedLinear(nn.Module):
    """nn.Linear with its weight prepacked for oneDNN (inference only, CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 attr: str = "none") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        # An opaque oneDNN tensor: kept as a plain attribute, out of state_dict and .to().
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.attr = attr

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight_dtype:
            x = x.to(self.weight_dtype)
        # GELU's algorithm: "none" is the exact (erf) form, as F.gelu's default.
        algorithm = "none" if self.attr == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias,
                                                  self.attr, [], algorithm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, attr={self.attr}")


class PackedConv2d(nn.Module):
    """nn.Conv2d with its weight prepacked for oneDNN; channels-last activations."""

    def __init__(self, conv: nn.Conv2d, input_hint: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.weight_dtype = conv.weight.dtype
        hint = [1, conv.in_channels, *input_hint]
        self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            conv.weight.detach().to_mkldnn(), self.padding, self.stride, self.dilation,
            self.groups, hint)
        self.bias = (None if conv.bias is None
                     else nn.Parameter(conv.bias.detach(), requires_grad=False))

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and _packable(conv.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight_dtype:
            x = x.to(self.weight_dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight, self.bias, self.padding, self.stride, self.dilation,
            self.groups, "none", [], "")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}")


class FusedGEGLU(nn.Module):
    """diffusers GEGLU (value * gelu(gate)) as two prepacked GEMMs with fused epilogues."""

    def __init__(self, geglu: nn.Module) -> None:
        super().__init__()
        weight, bias = geglu.proj.weight.detach(), geglu.proj.bias
        half = weight.shape[0] // 2
        value_bias = None if bias is None else bias.detach()[:half].contiguous()
        gate_bias = None if bias is None else bias.detach()[half:].contiguous()
        self.value = PackedLinear(weight[:half].contiguous(), value_bias)
        # GELU (exact, erf) applied to the fp32 accumulator inside the GEMM.
        self.gate = PackedLinear(weight[half:].contiguous(), gate_bias, attr="gelu")
        self.dim_out = half

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        v = self.value
        if hidden_states.dtype != v.weight_dtype:
            hidden_states = hidden_states.to(v.weight_dtype)
        gate = self.gate(hidden_states)
        # value GEMM with "mul" by the gate in the epilogue.
        return torch.ops.mkldnn._linear_pointwise.binary(
            hidden_states, gate, v.packed_weight, v.bias, "mul")


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
    def handles(attn: nn.Module) -> bool:
        return (attn.spatial_norm is None and attn.group_norm is None
                and attn.norm_q is None and attn.norm_k is None
                and not attn.residual_connection and not attn.is_cross_attention
                and isinstance(attn.to_q, nn.Linear | PackedLinear))

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
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

    def _key_value(self, attn: nn.Module, hidden_states: torch.Tensor,
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


def _attention_modules(module: nn.Module) -> Iterator[nn.Module]:
    from diffusers.models.attention_processor import Attention

    for sub in module.modules():
        if isinstance(sub, Attention):
            yield sub


class _FusedSlice(nn.Module):
    """One of q/k/v, computed by the attention's fused QKV GEMM (fallback path only)."""

    def __init__(self, attn: nn.Module, start: int, size: int, in_features: int) -> None:
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


def _swap(root: nn.Module, predicate, factory) -> int:
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if predicate(child):
                setattr(parent, name, factory(child))
                count += 1
    return count


def prepack_linears(root: nn.Module) -> int:
    return _swap(root, lambda m: type(m) is nn.Linear and _packable(m.weight),
                 PackedLinear.from_linear)


def prepack_convs(root: nn.Module) -> int:
    return _swap(root, PackedConv2d.supports, PackedConv2d)


def fuse_geglus(root: nn.Module) -> int:
    from diffusers.models.activations import GEGLU

    return _swap(root, lambda m: type(m) is GEGLU and type(m.proj) is nn.Linear
                 and _packable(m.proj.weight), FusedGEGLU)


class PromptEmbeddingCache:
    """LRU cache in front of StableDiffusionXLPipeline.encode_prompt, keyed by prompt.

    Only the plain case is cached: string prompts, no prompt_2/negatives/precomputed
    embeddings, no classifier-free guidance (SDXL-Turbo runs guidance_scale 0), no LoRA
    scale or clip_skip. Everything else is passed straight through.
    """

    def __init__(self, encode_prompt: Any, max_size: int) -> None:
        self.encode_prompt = encode_prompt
        self.max_size = max_size
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _cacheable(self, prompt: Any, kwargs: dict[str, Any]) -> bool:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list | tuple) or not all(isinstance(p, str) for p in prompt):
            return False
        if kwargs.get("do_classifier_free_guidance", True):
            return False
        passthrough = ("prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds",
                       "negative_prompt_embeds", "pooled_prompt_embeds",
                       "negative_pooled_prompt_embeds", "lora_scale", "clip_skip")
        return all(kwargs.get(name) is None for name in passthrough)

    def __call__(self, prompt: Any = None, *args: Any, **kwargs: Any):
        if args or not self._cacheable(prompt, kwargs):
            return self.encode_prompt(prompt, *args, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.entries))
        if missing:
            call = dict(kwargs, num_images_per_prompt=1)
            embeds, negative, pooled, negative_pooled = self.encode_prompt(missing, **call)
            if negative is not None or negative_pooled is not None:
                return self.encode_prompt(prompt, *args, **kwargs)
            for i, text in enumerate(missing):
                self.entries[text] = (embeds[i:i + 1].clone(), pooled[i:i + 1].clone())
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        found = [self.entries[p] for p in prompts]
        for text in prompts:
            self.entries.move_to_end(text)
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)
        repeat = int(kwargs.get("num_images_per_prompt") or 1)
        embeds = torch.cat([e for e, _ in found]).repeat_interleave(repeat, dim=0)
        pooled = torch.cat([p for _, p in found]).repeat_interleave(repeat, dim=0)
        device = kwargs.get("device")
        if device is not None:
            embeds, pooled = embeds.to(device), pooled.to(device)
        return embeds, None, pooled, None


def load_tiny_vae(path: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(path, torch_dtype=dtype).eval().requires_grad_(False)


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


def optimize_pipeline(pipe: Any, options: OptimizationConfig, *,
                      backend: str = "torch") -> LeverReport:
    """Apply the switched-on levers to a CPU pipeline in place.

    With backend "ipex", IPEX prepacks and fuses the weights itself (ipex.optimize after
    this), so only channels_last, the tiny VAE and the prompt cache are applied here.
    """
    report = LeverReport()
    applied = report.applied
    if backend == "ipex":
        options = options.model_copy(update={"prepack_linear": False, "prepack_conv": False,
                                             "fuse_geglu": False, "fuse_attention": False,
                                             "cross_attention_kv_cache": False})
    tiny_vae = getattr(options, "tiny_vae", None)
    if tiny_vae:
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
