"""int8 x int8 UNet layers for the torch backend (model.torch_int8: dynamic).

Every nn.Linear and nn.Conv2d of the UNet (its first and last convolutions excepted, which
see the latents themselves) becomes a module that keeps its weight as int8, one scale per
output channel, prepacked once for oneDNN, and quantizes its input to uint8 on every call
from that call's own range (asymmetric, one scale per tensor: "dynamic", no calibration
set). oneDNN then multiplies int8 by int8 with int32 accumulation and writes float output
(``onednn::qlinear_pointwise`` / ``qconv2d_pointwise``, the kernels torch's own x86 int8
path lowers to).

Why not torch's ``quantize_dynamic``: its convolution (``quantized::conv2d_dynamic``)
quantizes activations symmetrically around zero, which wastes half the range on the
outputs of SiLU and GroupNorm; on the full-size UNet it drifted 0.10 (mean absolute, one
step, random weights, output mean 0.26) where these modules drift 0.014 (BENCHMARKS.md,
"torch int8"). Why 7-bit inputs (``QMAX``): without VNNI, x86 multiplies uint8 by
int8 with pairwise int16 sums that saturate at full 8-bit range (measured: 0.10 relative
error on a normal input at 8 bits, 0.02 at 7).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

# torch.quantize_per_tensor is deprecated (torch 2.13 warns once) but still the one fused
# pass that turns floats into codes: the same in elementwise ops took 3-8x as long on the
# UNet's large activations (20 ms against 2.5 ms for 4096 x 1280). int8_unusable() reports
# a torch that has dropped it; the warning would only alarm readers of the replica's log.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)

# Inputs use 0..127: exact on every x86 CPU (see the module's docstring).
QMAX = 127
# The UNet's convolutions on the latents themselves keep float weights.
KEEP_FLOAT = ("conv_in", "conv_out")


def int8_unusable() -> str | None:
    """Why the int8 layers cannot run in this torch build, or None when they can."""
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (mkldnn) unavailable in this torch build"
    if not hasattr(torch, "quantize_per_tensor"):
        return f"torch {torch.__version__} lacks torch.quantize_per_tensor"
    missing = [name for name in ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack",
                                 "qconv2d_pointwise") if not hasattr(torch.ops.onednn, name)]
    if missing:
        return f"torch {torch.__version__} lacks onednn::{', '.join(missing)}"
    return None


# A layer's int8 form: its int8 weight, one float scale per output channel, its float bias.
Int8Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def int8_parts(layer: nn.Linear | nn.Conv2d) -> Int8Parts:
    """Symmetric int8 weights, one scale per output channel (dim 0), and the bias."""
    w = layer.weight.detach().float()
    scales = (w.abs().amax(dim=tuple(range(1, w.dim()))) / 127.0).clamp(min=1e-12)
    shape = (-1,) + (1,) * (w.dim() - 1)
    qweight = torch.clamp(torch.round(w / scales.view(shape)), -127, 127).to(torch.int8)
    bias = None if layer.bias is None else layer.bias.detach().float().clone()
    return qweight, scales, bias


def _quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """uint8 (0..QMAX) codes of x, its scale and zero point, from x's own range (which
    always includes 0, so zero is exact: padding and ReLU-like zeros stay zero)."""
    xf = x.detach().float()  # the same tensor when x is float32: no copy
    lo, hi = torch.aminmax(xf)
    lo_f, hi_f = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi_f - lo_f) / QMAX or 1.0
    zero_point = min(QMAX, max(0, round(-lo_f / scale)))
    codes = torch.quantize_per_tensor(xf, scale, zero_point, torch.quint8).int_repr()
    return codes, scale, zero_point


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and per-call int8 inputs (inference only, CPU).

    `linear` gives the shape; `parts` its int8 form (int8_parts, or read from the int8
    cache, when `linear` may be on the meta device). The tensors are plain attributes, out
    of state_dict."""

    def __init__(self, linear: nn.Linear, parts: Int8Parts | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight, self.w_scales, self.bias = parts or int8_parts(linear)
        self.w_zero_points = torch.zeros(self.w_scales.shape, dtype=torch.int64)
        # oneDNN's prepacked int8 weight: an opaque tensor.
        self.packed_weight = torch.ops.onednn.qlinear_prepack(qweight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero_point = _quantize_input(x)
        out = torch.ops.onednn.qlinear_pointwise(
            codes, scale, zero_point, self.packed_weight, self.w_scales, self.w_zero_points,
            self.bias, 1.0, 0, torch.float32, "none", [], "")
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Conv2d(nn.Module):
    """nn.Conv2d (zero padding) with int8 weights and per-call int8 inputs."""

    def __init__(self, conv: nn.Conv2d, parts: Int8Parts | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.geometry: tuple[list[int], list[int], list[int], int] = (
            list(conv.stride), list(conv.padding),  # type: ignore[arg-type]
            list(conv.dilation), conv.groups)
        qweight, self.w_scales, self.bias = parts or int8_parts(conv)
        self.w_zero_points = torch.zeros(self.w_scales.shape, dtype=torch.int64)
        self.packed_weight = torch.ops.onednn.qconv_prepack(qweight, self.w_scales, 1.0, 0,
                                                            *self.geometry, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero_point = _quantize_input(x)
        out = torch.ops.onednn.qconv2d_pointwise(
            codes, scale, zero_point, self.packed_weight, self.w_scales, self.w_zero_points,
            self.bias, *self.geometry, 1.0, 0, torch.float32, "none", [], "")
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, int8"


def _convertible(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _targets(root: Any, keep_float: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in root.named_modules()
            if name and name not in keep_float and _convertible(module)]


def _replace(root: Any, name: str, module: nn.Module, parts: Int8Parts | None) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    kind = Int8Linear if isinstance(module, nn.Linear) else Int8Conv2d
    setattr(parent, attr, kind(module, parts))  # type: ignore[arg-type]


def quantize_int8(root: Any, keep_float: tuple[str, ...] = KEEP_FLOAT,
                  sink: dict[str, torch.Tensor] | None = None) -> int:
    """Replace root's nn.Linear and nn.Conv2d modules (except those named in keep_float)
    with their int8 versions, in place; the float weights are freed as each one goes.
    `sink` collects what the int8 cache stores (`<name>.qweight`, `.scales`, `.bias`).
    Returns how many were replaced."""
    targets = _targets(root, keep_float)
    for name, module in targets:
        qweight, scales, bias = parts = int8_parts(module)  # type: ignore[arg-type]
        _replace(root, name, module, parts)
        if sink is not None:
            sink.update({f"{name}.qweight": qweight, f"{name}.scales": scales,
                         **({} if bias is None else {f"{name}.bias": bias})})
    return len(targets)


def load_int8(root: Any, tensors: dict[str, torch.Tensor],
              keep_float: tuple[str, ...] = KEEP_FLOAT) -> int:
    """quantize_int8's result from `tensors` (what its sink collected), on a `root` whose
    layers may be on the meta device: every layer quantize_int8 would convert must be in
    `tensors`, and nothing else. Returns how many were replaced."""
    targets = _targets(root, keep_float)
    names = {key.rsplit(".", 1)[0] for key in tensors}
    if names != {name for name, _ in targets}:
        raise ValueError(f"int8 tensors for {len(names)} layers, the model has "
                         f"{len(targets)} to convert")
    for name, module in targets:
        _replace(root, name, module, (tensors[f"{name}.qweight"], tensors[f"{name}.scales"],
                                      tensors.get(f"{name}.bias")))
    return len(targets)


def is_int8(root: Any) -> bool:
    """Whether root's layers were converted already (by quantize_int8 or load_int8)."""
    return any(isinstance(module, Int8Linear | Int8Conv2d) for module in root.modules())
