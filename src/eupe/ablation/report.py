"""``eupe ablation report``: the ablation of several seeds as the paper's table (a global, a keypoint and a dense
metric per arm, mean +- std over seeds), a PNG, and the paper's ViT-B numbers next to it for reference."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from eupe import storage
from eupe.ablation.run import ABLATION_FILE, ARM_ROWS, METRICS
from eupe.errors import EupeError
from eupe.results import write_result

# The paper's ablation of ViT-B (docs/recipe.md): TextVQA (global), SPair (keypoints), ADE20k (dense).
PAPER_VIT_B = {"direct": (46.8, 35.1, 41.9), "proxy": (49.5, 53.3, 52.0), "full": (50.4, 51.3, 52.4)}
PAPER_COLUMNS = ("TextVQA", "SPair", "ADE20k")
LABELS = {"knn_top1": "k-NN top-1", "keypoint_pck": "keypoint PCK", "seg_miou": "seg mIoU", "depth_rmse": "depth RMSE"}


def read_seed(folder: str) -> dict:
    uri = f"{folder.rstrip('/')}/{ABLATION_FILE}"
    if not storage.exists(uri):
        raise EupeError(f"--run {folder}: no {ABLATION_FILE} (not an `eupe ablation run` output folder)")
    record = storage.read_json(uri)
    if not isinstance(record, dict) or not isinstance(record.get("arms"), dict) or "seed" not in record:
        raise EupeError(f"{uri}: not an ablation record (expected seed and arms)")
    return record


def aggregate(records: list[dict]) -> dict:
    """arm -> metric -> {mean, std, n, values}, arms in the paper's order."""
    seeds = [r["seed"] for r in records]
    if len(set(seeds)) != len(seeds):
        raise EupeError(f"--run: the same seed twice ({sorted(seeds)})")
    table: dict[str, dict] = {}
    for arm in ARM_ROWS:
        rows = [r["arms"][arm] for r in records if arm in r["arms"]]
        if not rows:
            continue
        table[arm] = {"row": ARM_ROWS[arm]}
        for k in METRICS:
            values = [float(x[k]) for x in rows if isinstance(x.get(k), (int, float)) and math.isfinite(x[k])]
            table[arm][k] = {"mean": statistics.fmean(values) if values else None,
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                             "n": len(values), "values": values}
        chance = [x["knn_chance"] for x in rows if isinstance(x.get("knn_chance"), (int, float))]
        table[arm]["knn_chance"] = chance[0] if chance else None
    return table


def _cell(m: dict) -> str:
    return "n/a" if m["mean"] is None else f"{m['mean']:.3f} +- {m['std']:.3f}"


def markdown(table: dict, seeds: list[int]) -> str:
    head = ["arm", *(LABELS[k] for k in METRICS), "paper ViT-B " + " / ".join(PAPER_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm, row in table.items():
        paper = " / ".join(f"{v:g}" for v in PAPER_VIT_B[arm]) if arm in PAPER_VIT_B else "(not in the paper)"
        lines.append("| " + " | ".join([row["row"], *(_cell(row[k]) for k in METRICS), paper]) + " |")
    chance = next((r["knn_chance"] for r in table.values() if r.get("knn_chance") is not None), None)
    lines.append("")
    lines.append(f"Mean +- std over seeds {seeds}; higher is better except depth RMSE"
                 + (f"; k-NN chance level {chance:.3f}" if chance is not None else "") + ".")
    return "\n".join(lines) + "\n"


def plot(table: dict, seeds: list[int], path: str) -> None:
    from eupe.plots import plt, save_figure  # Agg, and the atomic PNG write every plot uses

    arms = list(table)
    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4 * (len(METRICS) + 1), 3.6))
    for ax, k in zip(axes, METRICS):
        means = [table[a][k]["mean"] or 0.0 for a in arms]
        stds = [table[a][k]["std"] or 0.0 for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(arms))])
        for i, a in enumerate(arms):
            ax.scatter([i] * len(table[a][k]["values"]), table[a][k]["values"], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(arms)), [table[a]["row"] for a in arms], rotation=30, ha="right")
        ax.set_title(LABELS[k] + (" (lower is better)" if k == "depth_rmse" else ""))
        if k == "knn_top1" and table[arms[0]].get("knn_chance") is not None:
            ax.axhline(table[arms[0]]["knn_chance"], color="grey", ls="--", lw=1, label="chance")
            ax.legend(loc="lower right", fontsize=8)
    ref = [a for a in arms if a in PAPER_VIT_B]
    ax = axes[-1]
    for j, name in enumerate(PAPER_COLUMNS):
        ax.plot(range(len(ref)), [PAPER_VIT_B[a][j] for a in ref], marker="o", label=name)
    ax.set_xticks(range(len(ref)), [ARM_ROWS[a] for a in ref], rotation=30, ha="right")
    ax.set_title("paper, ViT-B (reference)")
    ax.legend(fontsize=8)
    fig.suptitle(f"EUPE ablation at this scale: mean +- std over {len(seeds)} seed(s), dots = seeds")
    save_figure(fig, Path(path))  # lays the figure out, then writes it


def report(runs: list[str], out: str) -> dict:
    if not runs:
        raise EupeError("--run: give the output folder of at least one `eupe ablation run`")
    if Path(out).is_file():
        raise EupeError(f"--out {out}: is a file, not a folder")
    records = [read_seed(r) for r in runs]
    seeds = sorted(r["seed"] for r in records)
    table = aggregate(records)
    base = out.rstrip("/")
    storage.write_json(f"{base}/ablation.json", {"seeds": seeds, "arms": table, "paper_vit_b": {
        "columns": PAPER_COLUMNS, **PAPER_VIT_B}, "runs": [storage.relative_to(r, out) for r in runs]})
    text = markdown(table, seeds)
    storage.write_bytes(f"{base}/ablation.md", text.encode())
    if storage.is_s3(base):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            plot(table, seeds, f"{tmp}/ablation.png")
            storage.write_bytes(f"{base}/ablation.png", Path(f"{tmp}/ablation.png").read_bytes())
    else:
        Path(base).mkdir(parents=True, exist_ok=True)
        plot(table, seeds, f"{base}/ablation.png")
    print(text, end="")
    metrics = {f"{arm}.{k}": row[k]["mean"] for arm, row in table.items() for k in METRICS}
    metrics["seeds"] = len(seeds)
    return write_result(out, "ablation-report", metrics, {"json": f"{base}/ablation.json", "table": f"{base}/ablation.md",
                                                          "plot": f"{base}/ablation.png"})
