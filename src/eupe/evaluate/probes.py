"""Linear probes on frozen patch tokens: segmentation (1x1 linear map, logits upsampled to the mask,
trained briefly with AdamW, scored by mIoU on held-out images) and depth (a closed-form ridge
regression of the depth map, scored by RMSE in metres and delta < 1.25).

Features are standardized with the training split's per-channel mean/std (a frozen BatchNorm, as in
the usual linear-probe recipe), so one learning rate suits every encoder width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eupe.distill.normalize import StatsAccumulator


def linear_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: 1-D linear interpolation (align_corners=False), so that ``U_h @ x @ U_w.T`` equals
    ``F.interpolate(x, mode="bilinear")`` exactly, with matmul gradients (much faster on the CPU)."""
    eye = torch.eye(n_in)[:, None, :]  # n_in one-hot signals
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


class LinearProbe(nn.Module):
    """Standardize -> linear per token -> [B, out, L, L] bilinearly upsampled to the label size."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, out: int):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.linear = nn.Linear(mean.numel(), out)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
        x = self.linear((tokens.float() - self.mean) / self.std)  # [B, N, out]
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        if tuple(grid) == (size, size):
            return x
        rows = linear_resize_matrix(grid[0], size).to(x.device)
        cols = linear_resize_matrix(grid[1], size).to(x.device)
        return rows @ x @ cols.T


def feature_stats(tokens: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std (+ 1e-6) of [N, T, D] tokens, accumulated in float64 chunk by chunk."""
    acc = StatsAccumulator()
    acc.add("cls", tokens[:1, 0])  # its stats() reports a class-token entry too; only the patch one is used here
    for x in tokens.split(chunk):
        acc.add("patch", x)
    s = acc.stats(1e-6)
    return s.patch_mean, s.patch_std


# --------------------------------------------------------------------------- segmentation


def train_seg_probe(tokens: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor, num_classes: int, *,
                    ignore_index: int, epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int,
                    device: torch.device) -> tuple[LinearProbe, list[float]]:
    """Fit on [N, T, D] tokens against [N, L, L] masks; returns the probe and the per-epoch mean loss."""
    torch.manual_seed(seed)
    probe = LinearProbe(*feature_stats(tokens), num_classes).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    size = masks.shape[-1]
    losses = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in torch.randperm(tokens.shape[0], generator=g).split(batch_size):
            logits = probe(tokens[idx].to(device), grid, size)
            loss = F.cross_entropy(logits, masks[idx].to(device), ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        losses.append(total / count)
    return probe.eval(), losses


@torch.inference_mode()
def predict(probe: LinearProbe, tokens: torch.Tensor, grid: tuple[int, int], size: int, batch_size: int,
            device: torch.device, classes: bool = False) -> torch.Tensor:
    """Probe outputs on the CPU: [N, L, L] class indices when ``classes``, else [N, out, L, L] values."""
    outs = []
    for x in tokens.split(batch_size):
        y = probe(x.to(device), grid, size)
        outs.append((y.argmax(1) if classes else y).cpu())
    return torch.cat(outs)


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[float, list[float | None]]:
    """Mean IoU over the classes that occur in the prediction or the ground truth (ignored pixels skipped);
    also the per-class IoU (None for a class absent from both)."""
    keep = target != ignore_index
    conf = torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes**2).view(num_classes, num_classes)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    present = union > 0
    if 0 <= ignore_index < num_classes:  # e.g. ADE20k's 0 = "unlabelled": never a class of its own
        present[ignore_index] = False
    iou = inter / union.clamp_min(1)
    per_class = [float(v) if p else None for v, p in zip(iou.tolist(), present.tolist())]
    return (iou[present].mean().item() if present.any() else 0.0), per_class


# --------------------------------------------------------------------------- depth


def _pool_to_grid(depth: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean valid (> 0) depth of each feature cell ([N, h, w]) and whether the cell has any."""
    valid = (depth > 0).float()[:, None]
    s = F.adaptive_avg_pool2d(depth[:, None] * valid, grid)
    c = F.adaptive_avg_pool2d(valid, grid)
    return (s / c.clamp_min(1e-12))[:, 0], (c > 0)[:, 0]


def fit_depth_probe(tokens: torch.Tensor, grid: tuple[int, int], depths: torch.Tensor, ridge: float,
                    chunk: int = 64) -> LinearProbe:
    """Closed-form ridge regression from standardized tokens to the cell-averaged depth (metres).

    Exact and deterministic; ``ridge`` scales the identity added to the normal equations per sample
    (the bias is not regularized). Accumulated chunk by chunk in float64."""
    mean, std = feature_stats(tokens, chunk)
    d = tokens.shape[-1]
    xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(d + 1, dtype=torch.float64)
    n = 0
    for x, y in zip(tokens.split(chunk), depths.split(chunk)):
        target, valid = _pool_to_grid(y.float(), grid)
        x = ((x.float() - mean) / std).double()
        x = torch.cat([x, torch.ones_like(x[..., :1])], -1)[valid.flatten(1)]  # [M, D+1]
        t = target.flatten(1)[valid.flatten(1)].double()
        xtx += x.T @ x
        xty += x.T @ t
        n += x.shape[0]
    reg = torch.eye(d + 1, dtype=torch.float64) * ridge * max(n, 1)
    reg[d, d] = 0
    w = torch.linalg.lstsq(xtx + reg, xty[:, None]).solution[:, 0]
    probe = LinearProbe(mean, std, 1)
    with torch.no_grad():
        probe.linear.weight.copy_(w[:d].float()[None])
        probe.linear.bias.copy_(w[d:].float())
    return probe.eval()


@dataclass(frozen=True)
class DepthScores:
    rmse: float
    delta1: float


def depth_metrics(pred: torch.Tensor, target: torch.Tensor, min_depth: float = 1e-3) -> DepthScores:
    """RMSE (metres) and the fraction with max(pred/gt, gt/pred) < 1.25, over every valid (> 0) pixel."""
    valid = target > 0
    p, t = pred[valid].double().clamp_min(min_depth), target[valid].double()
    rmse = ((p - t) ** 2).mean().sqrt().item()
    delta1 = (torch.maximum(p / t, t / p) < 1.25).double().mean().item()
    return DepthScores(rmse, delta1)
