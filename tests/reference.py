"""Reference formulas written out independently of the code under test (known answers).

Each mirrors a sentence of the paper or of PyTorch's documentation, never a call into ``eupe``,
so that a test comparing the two fails when the library drifts from the recipe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return (1 - (a * b).sum(-1)).mean()


def smooth_l1(a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    d = (a - b).abs()
    return torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean()


def eupe_loss(s_cls, s_patch, t_cls, t_patch) -> torch.Tensor:
    """The paper: class token cosine; patch tokens 0.9 * cosine + 0.1 * smooth-L1 (beta 1)."""
    return cosine_distance(s_cls, t_cls) + 0.9 * cosine_distance(s_patch, t_patch) + 0.1 * smooth_l1(s_patch, t_patch)


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def resample_grid(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] row-major tokens -> [B, H*W, D], bilinear (align_corners=False) on [B, D, h, w]."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, grid[0], grid[1], d).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(b, size[0] * size[1], d)


def adapter_mlp(x: torch.Tensor, mlp: torch.nn.Sequential) -> torch.Tensor:
    """Linear -> LayerNorm -> GELU -> Linear with the weights of ``mlp``, written with torch.nn.functional."""
    fc1, norm, _, fc2 = mlp
    h = F.linear(x, fc1.weight, fc1.bias)
    h = F.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, norm.eps)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return F.linear(h, fc2.weight, fc2.bias)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps (step 0 already takes 1/warmup), then half a cosine from 1 to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2
