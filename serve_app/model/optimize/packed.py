"""oneDNN-prepacked Linear and Conv2d, and GEGLU fused into them (levers prepack_linear,
prepack_conv, fuse_geglu). bf16 weights need oneDNN's bf16 kernels (AVX-512 or
avx_ne_convert); float32 ones run on every x86 CPU."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from serve_app.model import cpu


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
            self.groups, hint)  # type: ignore[call-arg]  # torch's stub lacks input_size
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
        proj = cast(nn.Linear, geglu.proj)
        weight, bias = proj.weight.detach(), proj.bias
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
