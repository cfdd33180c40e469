"""The ViT block rewrites for XNNPACK's GEMMs (eupe.export.blocks): the rewritten copy computes what timm's
block does, the caller's model is untouched, and the lowered program stays one fully delegated XNNPACK
subgraph in fp32 and int8."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from eupe.config import ModelSpec
from eupe.export.blocks import BranchedMlp, ExportAttention, branches, fold_norm_affine, xnnpack_blocks
from eupe.export.lower import EncoderOutputs, fixed_size, lower_methods, to_program
from eupe.models.registry import build_model


def _trained_like(model: nn.Module) -> nn.Module:
    """Random LayerNorm scales and shifts far from their init (1, 0), with one outlier channel each, as trained
    ViTs have: a fold that dropped or misplaced them would show."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, 0.5)
            nn.init.normal_(m.bias, 0.0, 0.5)
            with torch.no_grad():
                m.weight[3] = 8.0
    return model.eval()


def _vit(dim: int = 96, heads: int = 3, size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    spec = ModelSpec(model="vit_t", img_size=size, kwargs={"depth": 2, "embed_dim": dim, "num_heads": heads})
    torch.manual_seed(0)
    model = EncoderOutputs(fixed_size(_trained_like(build_model(spec)), spec, size))
    return model, torch.randn(1, 3, size, size)


@pytest.mark.parametrize("hidden, dim, expected", [(3072, 768, 4), (1536, 384, 4), (4096, 1024, 8), (768, 192, 1),
                                                   (3000, 768, 4), (2000, 700, 4)])
def test_branches_keep_each_gemm_within_the_budget_and_divide_the_hidden_width(hidden, dim, expected):
    b = branches(hidden, dim)
    assert b == expected and hidden % b == 0 and hidden // b * dim <= 768 * 768
    assert b == 1 or hidden * dim > 1 << 18  # small MLPs stay whole


def test_branched_mlp_and_folded_norm_compute_the_original():
    torch.manual_seed(0)
    mlp = Mlp(64, 256).eval()
    x = torch.randn(2, 5, 64)
    branched = BranchedMlp(mlp, 4)
    assert [tuple(f.weight.shape) for f in branched.fc2] == [(64, 64)] * 4
    assert [f.bias is not None for f in branched.fc2] == [True, False, False, False]  # fc2's bias added once
    torch.testing.assert_close(branched(x), mlp(x), rtol=1e-5, atol=1e-5)

    norm, linear = _trained_like(nn.Sequential(nn.LayerNorm(64)))[0], nn.Linear(64, 32)
    ref = linear(norm(x))
    fold_norm_affine(norm, linear)
    assert norm.weight is None and norm.bias is None
    torch.testing.assert_close(linear(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_export_attention_computes_timms_attention_at_any_batch_and_refuses_a_mask():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4, qkv_bias=True).eval()
    attn.fused_attn = False
    x = torch.randn(3, 7, 48)
    for batch in (1, 3):  # batch 1: the 3-D path a device runs; more: int8 calibration's batches
        for own_views in (False, True):
            torch.testing.assert_close(ExportAttention(attn, own_views)(x[:batch]), attn(x[:batch]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no attention mask"):
        ExportAttention(attn)(x, attn_mask=torch.zeros(7, 7))


@pytest.mark.parametrize("int8", [False, True])
def test_xnnpack_blocks_rewrite_a_copy_that_computes_the_same(int8: bool):
    model, x = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    rewritten = xnnpack_blocks(model, int8=int8)
    kinds = {type(m).__name__ for m in rewritten.modules()}
    assert "ExportAttention" in kinds and "Attention" not in kinds
    assert "Mlp" in kinds and "BranchedMlp" not in kinds  # 96 x 384: small, whole
    norms = [m for m in rewritten.modules() if isinstance(m, nn.LayerNorm)]
    assert sum(m.weight is None for m in norms) == (0 if int8 else 4)  # norm1 and norm2 of 2 blocks, fp32 only
    for got, want in zip(rewritten(x), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model as it was
    assert any(type(m) is Attention for m in model.modules())
    plain = nn.Sequential(nn.Linear(4, 4))
    assert xnnpack_blocks(plain) is plain


def test_a_wide_vit_lowers_to_one_delegate_in_fp32_and_int8_with_the_same_outputs():
    from eupe.export.runtime import load_forward

    model, x = _vit(dim=768, heads=12)  # ViT-B's width: its MLP goes in 4 branches in fp32
    assert sum(type(m) is BranchedMlp for m in xnnpack_blocks(model).modules()) == 2
    ref = model(x)
    for int8 in (None, "dynamic"):
        lowered = lower_methods({"forward": lambda i=int8: to_program(model, x, i)}, f"wide_{int8}")
        assert lowered.subgraphs == 1 and lowered.non_delegated == {}
        cls, patches = load_forward(lowered.program, "wide")(x)
        cos = torch.nn.functional.cosine_similarity(patches.flatten(), ref[1].flatten(), 0)
        assert cos > (0.99999 if int8 is None else 0.99)
        if int8 is None:
            torch.testing.assert_close(cls, ref[0], rtol=1e-3, atol=1e-3)
