"""Each prepacked/fused module against the stock computation it replaces, in float32 and
bfloat16 (bf16 where oneDNN's bf16 kernels run on this CPU; see conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model.optimize import (
    CpuAttnProcessor,
    FusedGEGLU,
    PackedConv2d,
    PackedLinear,
    fuse_attention,
    mkldnn_available,
)
from tests.optimize.conftest import skip_unless_onednn_runs

pytestmark = pytest.mark.skipif(not mkldnn_available(), reason="oneDNN ops unavailable")
# Relative unit of each dtype's rounding. float32 gets 2**-16 rather than its 2**-23: the
# kernels sum in another order, and a sum of K products drifts by about K ulps.
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -16}


def close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2.0) -> None:
    """Within `ulps` units of the dtype's rounding (UNIT), of the reference's scale."""
    assert actual.dtype == expected.dtype
    scale = expected.float().abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= ulps * scale * UNIT[expected.dtype], (diff, scale)


@pytest.mark.parametrize("shape", [(7, 64), (2, 33, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_f_linear(shape, bias, packed_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias, dtype=packed_dtype)
    x = torch.randn(*shape, dtype=packed_dtype)
    packed = PackedLinear.from_linear(linear)
    with torch.inference_mode():
        out, ref = packed(x), F.linear(x, linear.weight, linear.bias)
    assert out.shape == ref.shape and out.dtype == packed_dtype
    close(out, ref)
    assert (packed.in_features, packed.out_features) == (64, 96)


def test_packed_bf16_linear_casts_float32_input():
    skip_unless_onednn_runs(torch.bfloat16)
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, dtype=torch.bfloat16)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        close(PackedLinear.from_linear(linear)(x), F.linear(x.to(torch.bfloat16), linear.weight,
                                                            linear.bias))


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_packed_conv_matches_conv2d_at_any_input_size(stride, padding, kernel, size,
                                                      packed_dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, kernel, stride=stride, padding=padding, dtype=packed_dtype)
    packed = PackedConv2d(conv, input_hint=(64, 64))  # the hint is not the input size
    x = torch.randn(2, 32, *size, dtype=packed_dtype)
    with torch.inference_mode():
        out, ref = packed(x), conv(x)
    assert out.shape == ref.shape
    close(out, ref)


def test_fused_geglu_matches_geglu(packed_dtype):
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(64, 128).to(packed_dtype)
    x = torch.randn(2, 10, 64, dtype=packed_dtype)
    with torch.inference_mode():
        ref, out = geglu(x), FusedGEGLU(geglu)(x)
    # GELU and the multiply run on the fp32 accumulator before the final bf16 rounding,
    # so a few bf16 ulps separate them.
    close(out, ref, ulps=4)


def test_cpu_attention_processor_matches_sdpa_processor(dtype):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    blocks = nn.ModuleList([Attention(64, heads=4, dim_head=16),
                            Attention(64, cross_attention_dim=32, heads=4, dim_head=16)])
    blocks = blocks.to(dtype)
    x, ctx = torch.randn(2, 20, 64, dtype=dtype), torch.randn(2, 7, 32, dtype=dtype)
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


class CountingLinear(nn.Linear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_cross_attention_kv_is_computed_once_per_prompt_tensor(dtype):
    import gc

    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).to(dtype)
    counting = CountingLinear(32, 64, bias=False, dtype=dtype)
    with torch.no_grad():
        counting.weight.copy_(attn.to_k.weight)
    attn.to_k = counting
    x = torch.randn(2, 20, 64, dtype=dtype)
    ctx, other = torch.randn(2, 7, 32, dtype=dtype), torch.randn(2, 7, 32, dtype=dtype)
    with torch.inference_mode():
        ref, ref_other = attn(x, encoder_hidden_states=ctx), attn(x, encoder_hidden_states=other)
        assert counting.calls == 2
        fuse_attention(attn, fuse_qkv=False, cache_cross_kv=True)
        processor = attn.processor
        steps = [attn(x + i, encoder_hidden_states=ctx) for i in range(3)]
        assert counting.calls == 3  # one projection for three steps on the same embeddings
        assert torch.equal(steps[0], ref)  # bit for bit
        assert torch.equal(attn(x, encoder_hidden_states=other), ref_other)
        assert counting.calls == 4  # another prompt tensor: recomputed
        assert torch.equal(attn(x, encoder_hidden_states=ctx), ref)
        assert counting.calls == 5  # and the first one again: the cache holds one entry
    del ctx, other
    gc.collect()
    assert processor._cross_kv is None  # freed with the embeddings it was computed from


def test_cross_attention_kv_cache_off_recomputes_every_call(dtype):
    from diffusers.models.attention_processor import Attention

    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).to(dtype)
    attn.to_k = CountingLinear(32, 64, bias=False, dtype=dtype)
    fuse_attention(attn, cache_cross_kv=False)
    x, ctx = torch.randn(1, 5, 64, dtype=dtype), torch.randn(1, 7, 32, dtype=dtype)
    with torch.inference_mode():
        for _ in range(3):
            attn(x, encoder_hidden_states=ctx)
    assert attn.to_k.calls == 3 and attn.processor._cross_kv is None


def test_the_probe_agrees_with_onednn_about_bf16():
    """The bf16 skips above are honest: where the probe says no, oneDNN refuses too."""
    from serve_app.model import cpu

    torch_says = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if cpu.host().capped_to is None:
        assert cpu.host().onednn_bf16 == torch_says
    linear = nn.Linear(16, 8, dtype=torch.bfloat16)
    if torch_says:
        assert PackedLinear.from_linear(linear).weight_dtype == torch.bfloat16
    else:
        with pytest.raises(RuntimeError, match="bf16 path needs"):
            PackedLinear.from_linear(linear)
