"""EUPE distillation loss: class token cosine; patch tokens 0.9 * cosine + 0.1 * smooth-L1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eupe.config import LossConfig


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over every vector (last dim)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def distill_loss(
    student_cls: torch.Tensor,
    student_patches: torch.Tensor,
    target_cls: torch.Tensor,
    target_patches: torch.Tensor,
    cfg: LossConfig,
) -> torch.Tensor:
    """Loss for one target, computed in fp32 whatever the autocast dtype."""
    s_cls, s_patch = student_cls.float(), student_patches.float()
    t_cls, t_patch = target_cls.float(), target_patches.float()
    cls = cfg.cls_cosine * cosine_distance(s_cls, t_cls)
    patch = cfg.patch_cosine * cosine_distance(s_patch, t_patch)
    patch = patch + cfg.patch_smooth_l1 * F.smooth_l1_loss(s_patch, t_patch, beta=cfg.smooth_l1_beta)
    return cls + patch
