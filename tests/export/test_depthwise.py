"""Large depthwise convolutions split for XNNPACK (eupe.export.depthwise): the split computes the original
convolution at any stride and padding it accepts, leaves other convolutions and the caller's model alone, and a
ConvNeXt lowers with no depthwise window over 25 taps, one XNNPACK subgraph, the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eupe.config import ModelSpec
from eupe.export.depthwise import FAST_TAPS, SplitDepthwise, _pieces, split_depthwise
from eupe.export.lower import EncoderOutputs, fixed_size, lower_methods, to_program
from eupe.models.registry import build_model


@pytest.mark.parametrize("kh, kw, expected", [
    (7, 7, [([2, 3, 4], 1), ([0, 6], 6), ([1, 5], 4)]),
    (9, 9, [([4], 1), ([0, 8], 8), ([1, 7], 6), ([2, 6], 4), ([3, 5], 2)]),
    (7, 3, [([0, 1, 2, 3, 4, 5, 6], 1)]),  # 21 taps: one piece (never split: not over 25)
    (6, 6, None), (7, 13, None),  # even rows have no centre row; two rows of 13 are over 25 taps
])
def test_pieces_cover_every_row_once_within_the_fast_window(kh, kw, expected):
    pieces = _pieces(kh, kw, kh // 2)
    assert pieces == expected
    if pieces:
        assert sorted(r for rows, _ in pieces for r in rows) == list(range(kh))
        assert all(len(rows) * kw <= FAST_TAPS for rows, _ in pieces)


@pytest.mark.parametrize("k, stride, padding, bias", [(7, 1, 3, True), (7, 2, 3, False), (9, 1, 4, True),
                                                      (7, 1, 5, True), (7, (2, 1), 3, True)])
def test_split_depthwise_computes_the_convolution(k, stride, padding, bias):
    torch.manual_seed(k)
    conv = nn.Conv2d(24, 24, k, stride=stride, padding=padding, groups=24, bias=bias).eval()
    x = torch.randn(2, 24, 19, 23)  # odd, unequal sides: any off-by-one in a piece's padding shows
    with torch.no_grad():
        torch.testing.assert_close(SplitDepthwise(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_split_depthwise_rewrites_a_copy_and_only_large_depthwise_convolutions():
    model = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                          nn.Conv2d(8, 8, 7, padding=3), nn.Conv2d(8, 16, 7, padding=3, groups=8),
                          nn.Conv2d(16, 16, 7, padding=1, groups=16)).eval()  # padding 1 < the centre's 2 rows
    out = split_depthwise(model)
    assert [type(m).__name__ for m in out] == ["SplitDepthwise", "Conv2d", "Conv2d", "Conv2d", "Conv2d"]
    assert all(type(m) is nn.Conv2d for m in model)  # the caller's model is untouched
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    vit = nn.Sequential(nn.Linear(4, 4))
    assert split_depthwise(vit) is vit  # nothing to split: no copy


def _depthwise_windows(program) -> list[int]:
    """Taps of every depthwise convolution in an exported program."""
    taps = []
    for node in program.graph_module.graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and ("conv2d" in name or "convolution" in name):
            weight = node.args[1].meta["val"]
            at = 6 if "conv2d" in name else 8  # conv2d(x, w, b, stride, padding, dilation, groups); convolution: 9 args
            groups = node.args[at] if len(node.args) > at else 1
            if groups > 1 and weight.shape[1] == 1:
                taps.append(weight.shape[2] * weight.shape[3])
    return taps


@pytest.mark.parametrize("int8", [None, "dynamic"])
def test_a_convnext_lowers_without_a_large_depthwise_window_and_the_same_outputs(int8):
    from eupe.export.runtime import load_forward

    spec = ModelSpec(model="convnext_t", img_size=64, kwargs={"dims": [16, 24, 32, 48], "depths": [1, 1, 1, 1]})
    torch.manual_seed(0)
    model = EncoderOutputs(fixed_size(build_model(spec).eval(), spec, 64)).eval()
    x = torch.randn(1, 3, 64, 64)
    before = _depthwise_windows(to_program(model, x, int8, rewrite_modules=False))
    after = _depthwise_windows(to_program(model, x, int8))
    assert before == [49] * 4 and sorted(after) == sorted([21, 14, 14] * 4)  # four blocks, three pieces each
    lowered = lower_methods({"forward": lambda: to_program(model, x, int8)}, f"convnext_{int8}")
    assert lowered.subgraphs == 1 and lowered.non_delegated == {}
    with torch.no_grad():
        ref = model(x)
    out = load_forward(lowered.program, "convnext")(x)
    for a, b in zip(out, ref):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)
        assert cos > (0.99999 if int8 is None else 0.99)
