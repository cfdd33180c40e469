"""Per-target adapters: student tokens -> a target's feature space. Dropped after training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eupe.models.features import Features


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear (paper)."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, dim_out))


def resample_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] on ``grid`` -> [B, H*W, D] on ``target`` by bilinear interpolation."""
    if tuple(grid) == tuple(target):
        return tokens
    b, n, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class TargetAdapter(nn.Module):
    """One per (student, target): an MLP for the class token and one for the patch tokens, since a
    target's summary and patch spaces can differ in width (PE's attention-pooled head, for example)."""

    def __init__(self, student_dims: tuple[int, int], target_dims: tuple[int, int], hidden: int):
        super().__init__()
        self.cls = mlp(student_dims[0], hidden, target_dims[0])
        self.patch = mlp(student_dims[1], hidden, target_dims[1])

    def forward(self, feats: Features, target_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        patches = resample_tokens(feats.patches, feats.grid, target_grid)
        return self.cls(feats.cls), self.patch(patches)
