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
    """Per-step losses thin, their moving average bold: stage-3 steps differ by the resolutions drawn."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.arange(1, len(history["loss"]) + 1)
    window = max(1, len(steps) // 10)
    curves = {"total": history["loss"], **history.get("per_target", {})}
    for i, (name, values) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, _smooth(values, window), color=color, linewidth=2.5 if name == "total" else 1.5,
                label=f"{name} (mean of {window})" if window > 1 else name)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
