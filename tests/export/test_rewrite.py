"""The graph rewrites that let XNNPACK take every operator: the rewritten program computes what the original
does (known answers, no lowering), and holds none of the operators it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eupe.export.rewrite import xnnpack_friendly

aten = torch.ops.aten


def _ops(program) -> set:
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


def _rewritten(module: nn.Module, *args: torch.Tensor):
    return xnnpack_friendly(torch.export.export(module.eval(), args, strict=False))


class Norms(nn.Module):
    """A token LayerNorm, a channel-last LayerNorm of a map (ConvNeXt's), one without affine parameters."""

    def __init__(self):
        super().__init__()
        self.tokens, self.channels, self.plain = nn.LayerNorm(24), nn.LayerNorm(8), nn.LayerNorm(24, elementwise_affine=False)
        for p in (self.tokens.weight, self.tokens.bias, self.channels.weight, self.channels.bias):
            nn.init.normal_(p)

    def forward(self, x, m):
        return self.tokens(x), self.channels(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), self.plain(x)


def _norm_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens for :class:`Norms` with a large common offset and an outlier channel, as trained ViTs have (a
    one-pass variance, E[x^2] - E[x]^2, would lose digits here; the two-pass rewrites must not), and a map."""
    torch.manual_seed(0)
    x = torch.randn(1, 17, 24) * 3 + 50
    x[..., 5] += 400
    return x, torch.randn(1, 8, 5, 5)


def test_layer_norm_becomes_means_over_a_4d_view_with_the_same_values():
    x, m = _norm_inputs()
    norms = Norms().eval()
    want = norms(x, m)
    program = _rewritten(norms, x, m)
    assert aten.layer_norm.default not in _ops(program) and aten.native_layer_norm.default not in _ops(program)
    means = [n for n in program.graph.nodes if n.target == aten.mean.dim]
    assert len(means) == 6 and all(n.args[0].meta["val"].dim() == 4 and list(n.args[1]) == [2, 3] and n.args[2]
                                   for n in means)  # XNNPACK's mean.dim: 4-D, over (2, 3), keepdim
    for got, ref in zip(program.module()(x, m), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class Attention(nn.Module):
    """timm's explicit attention path: qkv unbind, a 4-D q @ k^T, softmax, attn @ v; class token select."""

    def forward(self, qkv):
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn @ v
        return out[:, :, 0], out.expand(1, -1, -1, -1)


def test_attention_glue_becomes_slices_views_and_bmm():
    qkv = torch.randn(3, 1, 2, 9, 4)
    program = _rewritten(Attention(), qkv)
    left = {aten.unbind.int, aten.select.int, aten.expand.default, aten.matmul.default, aten.squeeze.dims} & _ops(program)
    assert not left and aten.bmm.default in _ops(program)
    for got, want in zip(program.module()(qkv), Attention()(qkv)):
        torch.testing.assert_close(got, want)


def test_global_average_pool_becomes_a_mean_and_real_broadcasts_stay():
    class Pool(nn.Module):
        def forward(self, x, t):
            return F.adaptive_avg_pool2d(x, 1), t.expand(3, -1)  # a real broadcast of the batch dim

    x, t = torch.randn(1, 6, 4, 4), torch.randn(1, 5)
    program = _rewritten(Pool(), x, t)
    assert aten.adaptive_avg_pool2d.default not in _ops(program) and aten.mean.dim in _ops(program)
    assert aten.expand.default in _ops(program)
    got = program.module()(x, t)
    torch.testing.assert_close(got[0], x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(got[1], t.expand(3, -1))


def test_gemm_layer_norms_swap_plain_layer_norms_for_the_same_values_and_leave_the_original_alone():
    from timm.layers import LayerNorm2d

    from eupe.export.rewrite import GemmLayerNorm, gemm_layer_norms

    x, m = _norm_inputs()
    norms = Norms().eval()
    norms.map = LayerNorm2d(8)  # channels-first (it permutes around the kernel): not a plain LayerNorm
    swapped = gemm_layer_norms(norms)
    assert [type(getattr(swapped, k)) for k in ("tokens", "channels", "plain", "map")] == [GemmLayerNorm] * 3 + [LayerNorm2d]
    assert type(norms.tokens) is nn.LayerNorm  # a copy was changed, not the caller's module
    for got, ref in zip(swapped(x, m), norms(x, m), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    plain = nn.Sequential(nn.Linear(4, 4))
    assert gemm_layer_norms(plain) is plain  # nothing to swap: no copy


def test_int8_leaves_the_normalization_statistics_in_fp32():
    from eupe.export.lower import quantize_int8
    from eupe.export.rewrite import gemm_layer_norms

    block = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    graph = quantize_int8(gemm_layer_norms(block), torch.randn(1, 10, 32))
    linears = [n for n in graph.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]
    quantized = ["dequantize" in str(getattr(n.args[1], "target", "")) for n in linears]
    assert len(linears) == 4 and sorted(quantized) == [False, False, True, True]  # the two statistics, the two layers
