"""PNG reports of ``eupe export`` (parity and size per variant) and ``eupe latency`` (run-time histogram)."""

from __future__ import annotations

from pathlib import Path

from eupe.plots import plt, save_figure  # Agg backend set there




def export_report(models: dict[str, dict], path: Path) -> Path:
    """Left: parity cosine of each variant against its bound. Right: .pte size."""
    names = list(models)
    colors = ["tab:blue" if m["dtype"] == "fp32" else "tab:orange" for m in models.values()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.6 * len(names) + 2), dpi=100)
    ax1.barh(names, [max(1 - m["parity_cosine"], 1e-9) for m in models.values()], color=colors)
    for i, m in enumerate(models.values()):
        ax1.plot([1 - m["min_cosine"]] * 2, [i - 0.4, i + 0.4], color="red", linewidth=2)
    ax1.set_xscale("log")
    ax1.set_xlabel("1 - parity cosine vs eager PyTorch (red: allowed)")
    ax1.invert_yaxis()
    ax2.barh(names, [m["bytes"] / 2**20 for m in models.values()], color=colors)
    ax2.set_xlabel(".pte size (MiB)")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("ExecuTorch export (XNNPACK): blue fp32, orange int8")
    return save_figure(fig, path)


def latency_histogram(runs_ms: list[float], median_ms: float, budget_ms: float | None, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(runs_ms, bins=min(30, max(5, len(runs_ms) // 2)), color="tab:blue", alpha=0.8)
    ax.axvline(median_ms, color="black", linestyle="--", label=f"median {median_ms:.2f} ms")
    if budget_ms is not None:
        ax.axvline(budget_ms, color="red", linewidth=2, label=f"budget {budget_ms:g} ms")
    ax.set_xlabel("latency per run (ms)")
    ax.set_ylabel("runs")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
