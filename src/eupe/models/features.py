"""Class token, patch tokens and token grid from any timm ViT/Eva or CNN, in one forward.

Two rules every caller relies on:

* **Aligned grids.** A model sees an image resized (never padded) to :func:`aligned_size`, the multiple of
  its token stride (patch size; a CNN's last reduction) nearest to the asked size, so its token grid covers
  exactly the image. Two grids over the same image then line up under bilinear resampling with
  ``align_corners=False`` (:func:`eupe.models.adapter.resample_tokens`): token centres map to each other
  exactly. timm would otherwise zero-pad a patch-14 model at 256 px to 266 px, a 19x19 grid whose last
  row and column see mostly padding and whose centres drift up to 0.6 of a student token.
* **The summary vector** (the "class" target) is a per-model choice, :data:`SUMMARIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# How a model's summary vector is taken (config field ``summary`` of a model):
#   cls   the class token (a model without one is refused)
#   pool  the model's own pooling head before any projection (timm ``forward_head(pre_logits=True)``):
#         PE-core's attention pool, an average pool, a CNN's global pool
#   mean  the mean of the patch tokens (prefix tokens excluded)
#   auto  the class token when the model has one, else its pool
SUMMARIES = ("auto", "cls", "pool", "mean")
SUMMARY_ATTR = "eupe_summary"  # set by eupe.models.registry.build_model from the model's spec


@dataclass
class Features:
    cls: torch.Tensor  # [B, C] summary vector
    patches: torch.Tensor  # [B, N, D] spatial tokens, row-major over the grid
    grid: tuple[int, int]  # (h, w) with h * w == N


def token_stride(model: nn.Module) -> int:
    """Pixels per token along a side: a ViT's patch size, a CNN's last feature reduction."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        p = embed.patch_size
        p = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
        if p[0] != p[1]:
            raise ValueError(f"{type(model).__name__}: non-square patches {p} are not supported")
        return int(p[0])
    info = getattr(model, "feature_info", None)
    if info:
        return int(info[-1]["reduction"])
    raise ValueError(f"{type(model).__name__}: cannot tell its token stride (no patch_embed, no feature_info)")


def aligned_size(model: nn.Module, size: int) -> int:
    """The input size a model runs at when asked for ``size``: the nearest multiple of its token stride
    (at least one token), e.g. 252/378/518 px for a patch-14 model asked for 256/384/512."""
    stride = token_stride(model)
    return max(1, round(size / stride)) * stride


def resolve_summary(model: nn.Module, choice: str | None = None) -> str:
    """``auto`` made concrete for ``model``; ``cls`` on a model without a class token fails."""
    choice = choice or getattr(model, SUMMARY_ATTR, "auto")
    if choice not in SUMMARIES:
        raise ValueError(f"unknown summary {choice!r} (known: {list(SUMMARIES)})")
    has_cls = getattr(model, "cls_token", None) is not None
    if choice == "auto":
        return "cls" if has_cls else "pool"
    if choice == "cls" and not has_cls:
        raise ValueError(f"{type(model).__name__} has no class token: summary 'cls' is impossible (use pool or mean)")
    return choice


def extract_features(model: nn.Module, x: torch.Tensor) -> Features:
    """ViTs: the summary vector of the model's ``summary`` choice and the tokens after the prefix (class +
    registers). CNNs: the pooled vector (or the mean of the map) and the last map."""
    out = model.forward_features(x)
    summary = resolve_summary(model)
    if out.ndim == 4:  # [B, C, H, W]
        grid = (out.shape[-2], out.shape[-1])
        patches = out.flatten(2).transpose(1, 2)
        cls = patches.mean(1) if summary == "mean" else model.forward_head(out, pre_logits=True)
        return Features(cls, patches, grid)
    prefix = getattr(model, "num_prefix_tokens", 0)
    patches = out[:, prefix:]
    grid = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    if summary == "cls":
        cls = out[:, 0]
    elif summary == "mean":
        cls = patches.mean(1)
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
    size = aligned_size(model, size)
    f = extract_features(model, torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    model.train(was_training)
    return f.cls.shape[-1], f.patches.shape[-1]
