"""Module rewrites of timm's ViT blocks that give XNNPACK's GEMMs the shapes they run fastest, before export.

The same function to float rounding, on a copy (:func:`xnnpack_blocks`; the eager model is never changed):

* **Attention as three linears** (:class:`ExportAttention`): ``q``, ``k``, ``v`` each from its own ``[D, D]``
  linear, the softmax scale folded into ``q``'s weights, ``k`` permuted once to ``[heads, d, N]``, two
  ``bmm``. timm's path reshapes the ``[N, 3D]`` output to 5-D, permutes it, unbinds it, scales ``q`` and
  transposes ``k`` again, each a copy in XNNPACK, and its one ``[3D, D]`` GEMM runs slower than three.
* **The MLP in branches** (:class:`BranchedMlp`, fp32): ``fc2(act(fc1(x)))`` as the sum over ``b`` hidden
  slices of ``fc2_i(act(fc1_i(x)))``, exact for an elementwise activation, square GEMMs (:func:`branches`).
  XNNPACK's GEMM does not tile the reduction: ViT-B's ``fc2`` (``K = 3072``, a
  9 MiB weight) ran at 0.65x ONNX Runtime's MLAS, its MLP in four ``[768, 768]`` branches level with it.
* **LayerNorm scale and shift folded into the next linear** (:func:`fold_norm_affine`, fp32): in a ``Block``,
  ``norm1`` feeds only ``attn.qkv`` and ``norm2`` only ``mlp.fc1``, so ``W (g * n + b) + c`` becomes
  ``(W diag(g)) n + (W b + c)``: two elementwise passes fewer per LayerNorm.

int8 keeps the MLP whole (XNNPACK quantizes each branch's input again: slower) and the LayerNorm's scale in
the LayerNorm (folded, it would widen the per-channel weight scales the quantizer picks); each of ``q``, ``k``,
``v`` reads its own view of the input (:meth:`ExportAttention._view`). Measured with
``benchmarks/export_latency.py`` on a 2-core AVX-512 Xeon, ViT-B/16 at 256 px against ONNX Runtime in the same
run: fp32 1.12x -> 1.01x, int8 1.15x -> 1.05x (the README's table, another run: 0.99x and 1.05x).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from eupe.export.rewrite import plain_layer_norm

# A branch's GEMM weight at most this many elements (2.25 MiB in fp32, ViT-B's [768, 768]).
GEMM_WEIGHT_BUDGET = 768 * 768
# An MLP layer of at most this many weights (1 MiB in fp32) stays whole: ViT-T's 192 x 768 runs no faster in branches.
SMALL_MLP = 1 << 18


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return out


def _plain_attention(m: nn.Module) -> bool:
    """timm's plain ``Attention``: no q/k normalization, no norm before ``proj``, no gate."""
    from timm.models.vision_transformer import Attention

    return (type(m) is Attention and isinstance(m.q_norm, nn.Identity) and isinstance(m.k_norm, nn.Identity)
            and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) and getattr(m, "gate", None) is None)


def _plain_mlp(m: nn.Module) -> bool:
    """timm's ``Mlp`` on the last dimension with an elementwise activation and no hidden norm."""
    from timm.layers import Mlp

    return (type(m) is Mlp and isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear)
            and isinstance(m.norm, nn.Identity) and isinstance(m.act, (nn.GELU, nn.ReLU, nn.SiLU)))


class ExportAttention(nn.Module):
    """timm's ``Attention`` (see :func:`_plain_attention`) for export: three linears, the scale in ``q``'s
    weights, one transpose per tensor, ``bmm`` over batch x heads."""

    def __init__(self, attn: nn.Module, own_views: bool = False):
        super().__init__()
        self.own_views = own_views
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        d = attn.attn_dim
        w, b = attn.qkv.weight.detach(), attn.qkv.bias
        b = b.detach() if b is not None else None
        scale = torch.ones(3 * d)
        scale[:d] = attn.scale
        w, b = w * scale[:, None], (b * scale if b is not None else None)
        self.q, self.k, self.v = (_linear(w[i * d:(i + 1) * d], b[i * d:(i + 1) * d] if b is not None else None)
                                  for i in range(3))
        self.proj = attn.proj

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, or (``own_views``) a view of it for one linear alone: int8's dynamic quantization of one input
        shared by three linears splits the XNNPACK partition at every block (ExecuTorch 1.5); one input each
        does not. In fp32 a view is a copy in XNNPACK (3 ms on ViT-B), so there ``x`` is shared."""
        return x.reshape(-1, x.shape[-1]) if self.own_views else x

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ExportAttention: no attention mask (an exported encoder's forward)")
        bsz, n, c = x.shape
        h, d = self.heads, self.head_dim
        q, k, v = (self.q(self._view(x)), self.k(self._view(x)), self.v(self._view(x)))
        if bsz == 1:  # what a device runs: 3-D, one reshape and one permute per tensor (each a copy in XNNPACK)
            q, v = (t.reshape(n, h, d).permute(1, 0, 2) for t in (q, v))
            out = torch.bmm(torch.bmm(q, k.reshape(n, h, d).permute(1, 2, 0)).softmax(-1), v)
            return self.proj(out.permute(1, 0, 2).reshape(1, n, h * d))
        q, v = (t.reshape(bsz, n, h, d).permute(0, 2, 1, 3).reshape(bsz * h, n, d) for t in (q, v))
        k = k.reshape(bsz, n, h, d).permute(0, 2, 3, 1).reshape(bsz * h, d, n)
        out = torch.bmm(torch.bmm(q, k).softmax(-1), v)
        return self.proj(out.reshape(bsz, h, n, d).permute(0, 2, 1, 3).reshape(bsz, n, h * d))


def branches(hidden: int, dim: int, budget: int = GEMM_WEIGHT_BUDGET) -> int:
    """How many hidden slices an MLP of ``dim -> hidden -> dim`` goes in (a divisor of ``hidden``; 1: whole).
    Square ``[dim, dim]`` GEMMs (``b = hidden / dim``), more where that leaves a weight over ``budget``
    elements; an MLP whose layers fit in :data:`SMALL_MLP` stays whole. Measured in fp32 against ONNX Runtime
    in one run: ViT-B 1.12x whole, 1.00x in 4 branches ([768, 768]), 1.05x in 8; ViT-S 0.96x whole, 0.94x in
    4 ([384, 384]); ViT-T (192 x 768) no faster in branches."""
    if hidden * dim <= SMALL_MLP:
        return 1
    b = max(hidden // dim if hidden % dim == 0 else 1, math.ceil(hidden * dim / budget))
    while hidden % b:
        b += 1
    return b


class BranchedMlp(nn.Module):
    """``fc2(act(fc1(x)))`` as ``sum_i fc2_i(act(fc1_i(x)))`` over ``b`` hidden slices (``fc2_0`` adds the bias)."""

    def __init__(self, mlp: nn.Module, b: int):
        super().__init__()
        self.act = mlp.act
        w1, w2 = mlp.fc1.weight.detach(), mlp.fc2.weight.detach()
        b1 = mlp.fc1.bias.detach().chunk(b) if mlp.fc1.bias is not None else [None] * b
        b2 = [mlp.fc2.bias] + [None] * (b - 1)  # the first branch adds fc2's bias
        self.fc1 = nn.ModuleList(_linear(w, c) for w, c in zip(w1.chunk(b, 0), b1))
        self.fc2 = nn.ModuleList(_linear(w, c) for w, c in zip(w2.chunk(b, 1), b2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for fc1, fc2 in zip(self.fc1, self.fc2):
            part = fc2(self.act(fc1(x)))
            y = part if y is None else y + part
        return y


def fold_norm_affine(norm: nn.Module, linear: nn.Linear) -> None:
    """``linear(norm(x))`` with ``norm``'s scale and shift moved into ``linear`` (in place: both are the copy's)."""
    if getattr(norm, "weight", None) is None and getattr(norm, "bias", None) is None:
        return
    w = linear.weight.detach()
    g = norm.weight.detach() if norm.weight is not None else torch.ones(w.shape[1])
    shift = w @ norm.bias.detach() if norm.bias is not None else torch.zeros(w.shape[0])
    bias = linear.bias.detach() + shift if linear.bias is not None else shift
    linear.weight = nn.Parameter(w * g[None, :], requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False)
    norm.weight, norm.bias = None, None


def xnnpack_blocks(module: nn.Module, int8: bool = False) -> nn.Module:
    """A copy of ``module`` with every timm ViT ``Block`` rewritten as the module docstring says (``module``
    itself when it has none). ``int8``: for the quantizer (MLPs whole, LayerNorm scales in place)."""
    from timm.models.vision_transformer import Block

    if not any(type(m) is Block for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for block in (m for m in module.modules() if type(m) is Block):
        if _plain_attention(block.attn):
            if plain_layer_norm(block.norm1) and not int8:
                fold_norm_affine(block.norm1, block.attn.qkv)
            block.attn = ExportAttention(block.attn, own_views=int8)
        if _plain_mlp(block.mlp):
            if plain_layer_norm(block.norm2) and not int8:
                fold_norm_affine(block.norm2, block.mlp.fc1)
            b = branches(block.mlp.fc1.out_features, block.mlp.fc1.in_features)
            if b > 1 and not int8:
                block.mlp = BranchedMlp(block.mlp, b)
    return module.eval()
