"""PNG reports next to the JSON they illustrate."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Lay out, write under a hidden temporary name, then rename: a reader never sees half a PNG."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve begins at step 1."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_curve(history: dict, path: Path, title: str = "") -> Path:
    """Per-step losses thin, their moving average bold, the total drawn last (never hidden under a target's line,
    dashed black). When the student drew several resolutions (stage 3), a second panel: the loss per drawn size."""
    sizes = [r.get("student") for r in history.get("resolutions", [])]
    by_size = sorted({s for s in sizes if s is not None})
    panels = 2 if len(by_size) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    steps = np.arange(1, len(history["loss"]) + 1)
    window = max(1, len(steps) // 10)
    targets = history.get("per_target", {})
    for i, (name, values) in enumerate(targets.items()):
        ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=1)
        ax.plot(steps, _smooth(values, window), color=f"C{i}", linewidth=1.5,
                label=f"{name} (mean of {window})" if window > 1 else name)
    ax.plot(steps, history["loss"], color="black", alpha=0.2, linewidth=1, zorder=5)
    ax.plot(steps, _smooth(history["loss"], window), color="black", linestyle="--", linewidth=2.5, zorder=6,
            label=f"total (mean of {window})" if window > 1 else "total")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        loss = np.asarray(history["loss"], dtype=float)
        for i, size in enumerate(by_size):
            at = np.array([s == size for s in sizes])
            ax.plot(steps[at], loss[at], "o-", color=f"C{i}", markersize=3, linewidth=1,
                    label=f"student {size} px ({int(at.sum())} steps, mean {loss[at].mean():.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("total loss at the drawn resolution")
        ax.set_title(f"{title}: by student resolution" if title else "by student resolution")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
