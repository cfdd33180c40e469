"""``eval.json``'s pictures: a bar chart of the metrics (with the baseline when gated) and one held-out
example each of the segmentation probe, the depth probe and the keypoint matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import matplotlib.patches

from eupe.plots import plt, save_figure  # Agg backend set there




def _rgb(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


def metrics_chart(scores: dict[str, float], path: Path, baseline: dict[str, float] | None = None,
                  title: str = "") -> Path:
    """Scores in [0, 1] (higher is better) on the left, depth RMSE (metres, lower is better) on the right."""
    higher = {k: v for k, v in scores.items() if k != "depth_rmse"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100, gridspec_kw={"width_ratios": [max(len(higher), 1), 1.5]})
    for ax, items, label in ((axes[0], higher, "score (higher is better)"),
                             (axes[1], {k: v for k, v in scores.items() if k == "depth_rmse"}, "metres (lower is better)")):
        names = list(items)
        x = np.arange(len(names))
        bars = ax.bar(x, [items[n] for n in names], color="tab:blue", label="this model")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        if baseline:
            base = [baseline.get(n, np.nan) for n in names]
            ax.scatter(x, base, marker="_", s=600, color="tab:red", zorder=3, label="baseline")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if ax is axes[0]:
            ax.set_ylim(0, 1.05)
            ax.set_title(title)
            if baseline:
                ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def seg_example(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, num_classes: int, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=100)
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    shown = truth.clone()
    shown[truth >= num_classes] = -1  # ignored pixels drawn blank
    axes[0].imshow(_rgb(image))
    axes[1].imshow(np.ma.masked_less(shown.numpy(), 0), cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation="nearest")
    axes[2].imshow(pred.numpy(), cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation="nearest")
    for ax, t in zip(axes, ("held-out image", "mask", "linear probe")):
        ax.set_title(t)
        ax.axis("off")
    present = sorted({int(c) for c in torch.cat([truth.flatten(), pred.flatten()]).unique() if 0 <= int(c) < num_classes})
    handles = [matplotlib.patches.Patch(color=cmap(c), label=f"class {c}") for c in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.18)
    return save_figure(fig, path)


def depth_example(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=100)
    valid = truth > 0
    lo, hi = (float(truth[valid].min()), float(truth[valid].max())) if valid.any() else (0.0, 1.0)
    axes[0].imshow(_rgb(image))
    shown = axes[1].imshow(np.ma.masked_where(~valid.numpy(), truth.numpy()), cmap="viridis_r", vmin=lo, vmax=hi)
    im = axes[2].imshow(pred.numpy(), cmap="viridis_r", vmin=lo, vmax=hi)
    for ax, t in zip(axes, ("held-out image", "depth (m)", "linear probe (m)")):
        ax.set_title(t)
        ax.axis("off")
    for ax, mappable in ((axes[1], shown), (axes[2], im)):  # a colour bar on every depth panel
        fig.colorbar(mappable, ax=ax, fraction=0.046, label="depth (m)")
    return save_figure(fig, path)


def keypoint_example(image: torch.Tensor, warped: torch.Tensor, source: torch.Tensor, predicted: torch.Tensor,
                     valid: torch.Tensor, correct: torch.Tensor, path: Path) -> Path:
    """Source keypoints (left) and their matches in the warped image (right): green correct, red wrong."""
    width = image.shape[-1]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    ax.imshow(np.concatenate([_rgb(image), _rgb(warped)], axis=1))
    for k in torch.nonzero(valid).flatten().tolist():
        (x0, y0), (x1, y1) = source[k].tolist(), predicted[k].tolist()
        colour = "tab:green" if correct[k] else "tab:red"
        ax.plot([x0, x1 + width], [y0, y1], color=colour, linewidth=0.8, alpha=0.8, marker=".", markersize=4)
    ax.set_title(f"keypoint matches: {int(correct.sum())}/{int(valid.sum())} correct (image | warp)")
    ax.axis("off")
    return save_figure(fig, path)
