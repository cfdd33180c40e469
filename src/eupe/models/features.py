"""Class token, patch tokens and token grid from any timm ViT/Eva or CNN, in one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Features:
    cls: torch.Tensor  # [B, C] summary vector
    patches: torch.Tensor  # [B, N, D] spatial tokens, row-major over the grid
    grid: tuple[int, int]  # (h, w) with h * w == N


def extract_features(model: nn.Module, x: torch.Tensor) -> Features:
    """ViTs: the class token (or the model's own pooling when it has none, e.g. PE's attention pool)
    and the tokens after the prefix (class + registers). CNNs: the pooled vector and the last map."""
    out = model.forward_features(x)
    if out.ndim == 4:  # [B, C, H, W]
        grid = (out.shape[-2], out.shape[-1])
        return Features(model.forward_head(out, pre_logits=True), out.flatten(2).transpose(1, 2), grid)
    prefix = getattr(model, "num_prefix_tokens", 0)
    patches = out[:, prefix:]
    grid = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    if getattr(model, "cls_token", None) is not None:
        cls = out[:, 0]
    else:
        cls = model.forward_head(out, pre_logits=True)
    if grid[0] * grid[1] != patches.shape[1]:
        raise RuntimeError(f"{type(model).__name__}: {patches.shape[1]} tokens do not fill a {grid} grid")
    return Features(cls, patches, tuple(grid))


@torch.no_grad()
def feature_dims(model: nn.Module, size: int) -> tuple[int, int]:
    """(class dim, patch dim) from one tiny forward on the meta-free CPU path."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    f = extract_features(model, torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    model.train(was_training)
    return f.cls.shape[-1], f.patches.shape[-1]
