"""PNG reports next to the JSON they illustrate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

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


def loss_curve(history: dict, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = range(1, len(history["loss"]) + 1)
    ax.plot(steps, history["loss"], label="total", linewidth=2)
    for name, values in history.get("per_target", {}).items():
        ax.plot(steps, values, label=name, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
