"""Large depthwise convolutions split into pieces XNNPACK runs on its fast kernels, before export.

XNNPACK's depthwise kernels in ExecuTorch 1.5.1 take a window of at most 25 taps in one pass (3 x 3, 5 x 5);
a 7 x 7 window (ConvNeXt's, 49 taps) falls to a path 11-30x slower than ONNX Runtime's (six 7 x 7 depthwise
convolutions at 64 x 64 x 96: 35.1 ms against 1.2 ms; 5 x 5: 1.6 against 0.9), and ConvNeXt-T's 18 of them
took 35 ms of its 80 ms at 256 px. :class:`SplitDepthwise` computes the same convolution as a sum of depthwise
convolutions of at most 25 taps each (the same function to float rounding; stride and padding kept):

* the centre rows ``c .. kh-1-c`` as one convolution (``kh - 2c`` rows, ``(kh - 2c) * kw <= 25``);
* each pair of outer rows ``r`` and ``kh-1-r`` as one 2-row convolution dilated ``kh-1-2r`` apart.

Every piece keeps the output size because each is symmetric about the centre row: a piece whose rows start at
``r`` runs with padding ``P - r`` (``P`` the original's). A 7 x 7 window becomes 3 x 7 (21 taps) + rows 1 and 5
(14 taps) + rows 0 and 6 (14 taps). ConvNeXt-T at 256 px in ExecuTorch, against ONNX Runtime in the same run:
1.66x -> 1.04x, int8 0.39x -> 0.18x (``benchmarks/export_latency.py --plain``, the same rounds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eupe.export.rewrite import swap_modules

FAST_TAPS = 25  # the largest window XNNPACK's depthwise kernels take in one pass (5 x 5)


def _pieces(kh: int, kw: int, pad_h: int) -> list[tuple[list[int], int]] | None:
    """``[(rows, dilation)]`` covering the ``kh`` rows of a ``kh x kw`` window, each piece at most
    :data:`FAST_TAPS` taps and symmetric about the centre row; None when no such split exists."""
    if kh % 2 == 0 or 2 * kw > FAST_TAPS:
        return None
    centre = max(h for h in range(1, kh + 1, 2) if h * kw <= FAST_TAPS)  # odd: symmetric about the middle row
    c = (kh - centre) // 2
    if pad_h < c:
        return None
    return [(list(range(c, kh - c)), 1)] + [([r, kh - 1 - r], kh - 1 - 2 * r) for r in range(c)]


def _large_depthwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.padding_mode == "zeros"
            and m.dilation == (1, 1) and isinstance(m.padding, tuple)
            and m.kernel_size[0] * m.kernel_size[1] > FAST_TAPS
            and _pieces(*m.kernel_size, m.padding[0]) is not None)


class SplitDepthwise(nn.Module):
    """A depthwise ``nn.Conv2d`` as the sum of depthwise convolutions of at most :data:`FAST_TAPS` taps."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        kh, kw = conv.kernel_size
        self.groups, self.stride, (pad_h, self.pad_w) = conv.groups, conv.stride, conv.padding
        self.pieces = []
        for i, (rows, dilation) in enumerate(_pieces(kh, kw, pad_h)):
            self.register_buffer(f"w{i}", conv.weight.detach()[:, :, rows].clone())
            self.pieces.append((pad_h - rows[0], dilation))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for i, (pad_h, dilation) in enumerate(self.pieces):
            y = F.conv2d(x, getattr(self, f"w{i}"), self.bias if i == 0 else None, stride=self.stride,
                         padding=(pad_h, self.pad_w), dilation=(dilation, 1), groups=self.groups)
            out = y if out is None else out + y
        return out


def split_depthwise(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every depthwise convolution over :data:`FAST_TAPS` taps as
    :class:`SplitDepthwise` (``module`` itself when it has none: a ViT)."""
    return swap_modules(module, _large_depthwise, SplitDepthwise)
