"""PNG plots of the data audit, written next to ``validation.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from eupe.plots import plt, save_figure  # Agg backend set there

__all__ = ["balance_bars", "resolution_histogram", "stats_scatter"]




def resolution_histogram(df: pd.DataFrame, resolutions: list[int], min_side: int, path: Path) -> Path:
    """Shortest sides of the decodable images, with the stage-3 buckets and the minimum side marked."""
    sides = df["short_side"].dropna().to_numpy()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if sides.size:
        ax.hist(sides, bins=min(50, max(5, int(np.sqrt(sides.size)))), color="tab:blue", alpha=0.8)
    for r in sorted(set(resolutions)):
        n = int((sides >= r).sum())
        ax.axvline(r, color="tab:orange", linestyle="--")
        ax.annotate(f"{r}px: {n}", (r, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                    fontsize=8, color="tab:orange")
    ax.axvline(min_side, color="tab:red", linewidth=2, label=f"min side {min_side}")
    ax.set_xlabel("shortest side (px)")
    ax.set_ylabel("images")
    ax.set_title(f"resolution ({sides.size} decodable images; dashed: stage-3 buckets)")
    ax.legend(loc="best")
    return save_figure(fig, path)


def balance_bars(groups: dict[str, dict[str, int]], path: Path) -> Path:
    """One bar chart per grouping (class, domain) of the decodable images that has labels; a grouping without
    any (no domains) gets no empty panel; with none at all, one panel says so."""
    shown = {kind: counts for kind, counts in groups.items() if counts}
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(5 * max(1, len(shown)), 4), dpi=100, squeeze=False)
    if not shown:
        axes[0][0].text(0.5, 0.5, f"no {' or '.join(groups)} labels", ha="center", va="center",
                        transform=axes[0][0].transAxes)
        axes[0][0].axis("off")
    for ax, (kind, counts) in zip(axes[0], shown.items()):
        ax.bar(list(counts), list(counts.values()), color="tab:green")
        ax.tick_params(axis="x", rotation=45 if len(counts) > 6 else 0, labelsize=8)
        lo, hi = min(counts.values()), max(counts.values())
        ax.set_title(f"{kind} balance (max/min = {hi / lo:.2f})")
        ax.set_ylabel("images")
    return save_figure(fig, path)


def stats_scatter(df: pd.DataFrame, outliers: pd.Series, path: Path) -> Path:
    """Per-image brightness (mean of the channel means) against contrast (mean channel std), outliers in red."""
    ok = df["decodable"].fillna(False).astype(bool)
    mean = df.loc[ok, ["mean_r", "mean_g", "mean_b"]].mean(axis=1)
    std = df.loc[ok, ["std_r", "std_g", "std_b"]].mean(axis=1)
    flag = outliers[ok].astype(bool)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    ax.scatter(mean[~flag], std[~flag], s=8, alpha=0.6, color="tab:blue", label=f"images ({int((~flag).sum())})")
    ax.scatter(mean[flag], std[flag], s=40, marker="x", color="tab:red", label=f"outliers ({int(flag.sum())})")
    ax.set_xlabel("mean intensity (mean of channel means)")
    ax.set_ylabel("contrast (mean of channel stds)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("per-image statistics")
    ax.legend(loc="upper right")
    return save_figure(fig, path)
