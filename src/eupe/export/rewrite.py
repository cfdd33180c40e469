"""Graph rewrites that let XNNPACK take every compute operator of our encoders.

ExecuTorch 1.5's XNNPACK partitioner has no LayerNorm, takes ``mean.dim`` only as a 4-D global average
over dims (2, 3), and leaves the glue that timm's attention and pooling export with (a 4-D ``matmul``'s
``expand``, ``unbind``'s ``squeeze``, the class token's ``select``, ``adaptive_avg_pool2d``'s
``as_strided``) to the portable kernels, each one cutting the delegate in two. :data:`DECOMPOSITIONS`
re-expresses them with operators XNNPACK does take, applied to an ``ExportedProgram`` by
:func:`xnnpack_friendly` before lowering (after int8 conversion, so that the quantizer never sees them):

* ``layer_norm`` over the last C elements: ``x.view(-1, 1, C, 1)``, whose 4-D mean over (2, 3) is the
  per-token mean (one channel, so XNNPACK's NHWC layout is the same memory), then
  ``(x - mu) * rsqrt(mean((x - mu)^2) + eps) * w + b``: two passes, as numerically stable as the kernel;
* a batched 4-D ``matmul`` (attention's ``q @ k^T`` and ``attn @ v``): reshape to 3-D, ``bmm``, reshape back;
* ``select`` -> ``slice`` + ``view``; ``unbind`` -> one ``select`` per slice; an ``expand`` to the shape it
  already has -> ``view``; ``adaptive_avg_pool2d`` to 1 x 1 -> ``mean.dim`` over (2, 3).

Anything else (a real broadcast, a matmul that broadcasts its batch) keeps PyTorch's own decomposition.

Before export, :func:`gemm_layer_norms` swaps every ``nn.LayerNorm`` module for :class:`GemmLayerNorm`, which
takes both statistics with a fully-connected layer (a constant ``1/C`` row). XNNPACK runs the 4-D ``mean.dim``
above as global average pooling over a single channel, which does not vectorize: 25 LayerNorms at ViT-S's
257 x 384 took 4.9 ms that way and 1.7 ms as GEMMs (0.4 ms with no normalization at all), on a 2-core AVX-512
Xeon. The decomposition above stays for a ``layer_norm`` that is not a module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

aten = torch.ops.aten


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    c = math.prod(normalized_shape)
    x4 = x.reshape(-1, 1, c, 1)
    centred = x4 - aten.mean.dim(x4, [2, 3], True)
    var = aten.mean.dim(centred * centred, [2, 3], True)
    y = (centred * aten.rsqrt.default(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class GemmLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dimension, with its mean and variance taken by ``F.linear`` against a
    constant ``[1, C]`` row of ``1/C``: ``c = x - mean(x)``, ``c * rsqrt(mean(c^2) + eps) * w + b`` (two passes,
    as stable as the kernel). The same numbers to float rounding; the int8 quantizer leaves it in fp32."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        (c,) = norm.normalized_shape
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.register_buffer("row", torch.full((1, c), 1.0 / c), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x - F.linear(x, self.row)
        y = c * torch.rsqrt(F.linear(c * c, self.row) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def plain_layer_norm(m: nn.Module) -> bool:
    """A LayerNorm over the last dimension only: ``nn.LayerNorm`` or timm's ``LayerNorm`` (not timm's
    channels-first ``LayerNorm2d``, which permutes around it)."""
    from timm.layers import LayerNorm as TimmLayerNorm

    return type(m) in (nn.LayerNorm, TimmLayerNorm) and len(m.normalized_shape) == 1


def swap_modules(module: nn.Module, match: Callable[[nn.Module], bool],
                 make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``module`` with every submodule ``m`` for which ``match(m)`` replaced by ``make(m)`` (``module``
    itself when none matches; never modified)."""
    if not any(match(m) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
    return module


def gemm_layer_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every plain LayerNorm a :class:`GemmLayerNorm` (``module`` itself when it has
    none; never modified)."""
    return swap_modules(module, plain_layer_norm, GemmLayerNorm)


def _select(x, dim, index):
    dim, index = dim % x.dim(), index % x.shape[dim]
    return aten.slice.Tensor(x, dim, index, index + 1).reshape([s for i, s in enumerate(x.shape) if i != dim])


def _unbind(x, dim=0):
    return [_select(x, dim, i) for i in range(x.shape[dim])]


def _expand(x, size, implicit=False):
    lead = len(size) - x.dim()
    full = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(size)]
    if lead == 0 and list(x.shape) == full:
        return aten.view.default(x, full)
    return NotImplemented  # a real broadcast: PyTorch's own handling


def _matmul(a, b):
    if a.dim() >= 3 and b.dim() >= 3 and a.shape[:-2] == b.shape[:-2]:
        out = aten.bmm.default(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
        return out.reshape(*a.shape[:-2], a.shape[-2], b.shape[-1])
    return NotImplemented


def _adaptive_avg_pool2d(x, output_size):
    if x.dim() == 4 and list(output_size) == [1, 1]:
        return aten.mean.dim(x, [2, 3], True)
    return NotImplemented


DECOMPOSITIONS = {
    aten.layer_norm.default: _layer_norm,
    aten.matmul.default: _matmul,
    aten.select.int: _select,
    aten.unbind.int: _unbind,
    aten.expand.default: _expand,
    aten.adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
}


def forget_provenance(gm: torch.fx.GraphModule):
    """Drop every node's ``from_node`` record (debug provenance only). Each pass deep-copies the whole
    chain into the nodes it creates, so that the chain grows with every pass and lowering a ViT-B spent
    a third of its time copying it. Also usable as a ``transform_passes`` entry."""
    from torch.fx.passes.infra.pass_base import PassResult

    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("from_node", None)
    return PassResult(gm, False)


def xnnpack_friendly(program: ExportedProgram) -> ExportedProgram:
    """``program`` with :data:`DECOMPOSITIONS` applied (only those: every other operator is left for
    ``to_edge_transform_and_lower`` and the partitioner to decide)."""
    program = program.run_decompositions(dict(DECOMPOSITIONS))
    forget_provenance(program.graph_module)
    return program
