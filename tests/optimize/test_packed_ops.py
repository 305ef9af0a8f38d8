"""Each prepacked/fused module against the stock computation it replaces (bf16, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serve_app.optimize import (
    CpuAttnProcessor,
    FusedGEGLU,
    PackedConv2d,
    PackedLinear,
    fuse_attention,
    mkldnn_available,
)

pytestmark = pytest.mark.skipif(not mkldnn_available(), reason="oneDNN ops unavailable")
BF16 = torch.bfloat16


def close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2.0) -> None:
    """Within `ulps` bf16 units (2**-8 relative) of the reference's scale."""
    scale = expected.float().abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= ulps * scale * 2.0 ** -8, (diff, scale)


@pytest.mark.parametrize("shape", [(7, 64), (2, 33, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias, dtype=BF16)
    x = torch.randn(*shape, dtype=BF16)
    packed = PackedLinear.from_linear(linear)
    with torch.inference_mode():
        out, ref = packed(x), F.linear(x, linear.weight, linear.bias)
    assert out.shape == ref.shape and out.dtype == BF16
    close(out, ref)
    assert (packed.in_features, packed.out_features) == (64, 96)


def test_packed_linear_casts_float32_input():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, dtype=BF16)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        close(PackedLinear.from_linear(linear)(x), F.linear(x.to(BF16), linear.weight,
                                                            linear.bias))


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_packed_conv_matches_conv2d_at_any_input_size(stride, padding, kernel, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, kernel, stride=stride, padding=padding, dtype=BF16)
    packed = PackedConv2d(conv, input_hint=(64, 64))  # the hint is not the input size
    x = torch.randn(2, 32, *size, dtype=BF16)
    with torch.inference_mode():
        out, ref = packed(x), conv(x)
    assert out.shape == ref.shape
    close(out, ref)


def test_fused_geglu_matches_geglu():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(64, 128).to(BF16)
    x = torch.randn(2, 10, 64, dtype=BF16)
    with torch.inference_mode():
        ref, out = geglu(x), FusedGEGLU(geglu)(x)
    # GELU and the multiply run on the fp32 accumulator before the final bf16 rounding,
    # so a few bf16 ulps separate them.
    close(out, ref, ulps=4)


def test_cpu_attention_processor_matches_sdpa_processor():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    blocks = nn.ModuleList([Attention(64, heads=4, dim_head=16),
                            Attention(64, cross_attention_dim=32, heads=4, dim_head=16)])
    blocks = blocks.to(BF16)
    x, ctx = torch.randn(2, 20, 64, dtype=BF16), torch.randn(2, 7, 32, dtype=BF16)
    with torch.inference_mode():
        ref_self, ref_cross = blocks[0](x), blocks[1](x, encoder_hidden_states=ctx)
        assert fuse_attention(blocks) == 2
        assert isinstance(blocks[0].processor, CpuAttnProcessor)
        assert hasattr(blocks[0], "cpu_qkv") and not hasattr(blocks[1], "cpu_qkv")
        close(blocks[0](x), ref_self)
        close(blocks[1](x, encoder_hidden_states=ctx), ref_cross)
        # The fallback path (a mask) still works through the fused q/k/v slices.
        mask = torch.ones(2, 20, dtype=torch.bool)
        close(blocks[0](x, attention_mask=mask), ref_self)
