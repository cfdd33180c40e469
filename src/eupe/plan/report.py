"""The plan as a table (stdout), JSON and a PNG of stacked bars."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from eupe import storage
from eupe.plan.recommend import GIB, StagePlan, size
from eupe.plan.step import Measurement

# Table columns: the tracker's categories, activations and backward temporaries together.
COLUMNS = {
    "trained": ("trained params",),
    "grads": ("gradients",),
    "optim": ("optimizer state",),
    "frozen": ("frozen targets",),
    "activ": ("activations", "backward temporaries"),
    "other": ("buffers",),
}


def columns(m: Measurement, unit: int = GIB) -> dict[str, float]:
    """Size per table column in ``unit`` bytes; the columns add up to the peak."""
    return {col: sum(m.parts.get(k, 0) for k in keys) / unit for col, keys in COLUMNS.items()}


def _unit(plans: list[StagePlan]) -> tuple[int, str]:
    peaks = [m.peak for p in plans for m in p.table]
    return (GIB, "GiB") if max(peaks, default=GIB) >= GIB else (2**20, "MiB")


def _row(stage: int, m: Measurement, budget: int, unit: int, mark: str = "") -> str:
    cols = columns(m, unit)
    cells = "".join(f"{cols[c]:>8.1f}" for c in COLUMNS)
    fits = "yes" if m.peak <= budget else "no"
    return f"{stage!s:<6}{m.option + mark:<9}{m.micro_batch:>6}{cells}{m.peak / unit:>9.1f}  {fits:<4} {m.phase}"


def header(meta: dict, unit_name: str = "GiB") -> str:
    return (f"eupe plan: {meta['config']} on {meta['world_size']} GPU(s) ({meta['nodes']} node(s) x {meta['gpus']}) "
            f"of {size(meta['gpu_memory'])}; budget {size(meta['budget'])} per GPU ({meta['headroom']:.0%} headroom); "
            f"{meta['precision']}; {unit_name} per GPU at each step's peak")


def table(plans: list[StagePlan], meta: dict) -> str:
    unit, unit_name = _unit(plans)
    lines = [header(meta, unit_name),
             f"{'stage':<6}{'option':<9}{'micro':>6}" + "".join(f"{c:>8}" for c in COLUMNS)
             + f"{'peak':>9}  fits peak in"]
    for p in plans:
        for m in p.table:
            lines.append(_row(p.stage, m, p.budget, unit))
        if p.choice is not None and p.choice not in p.table:
            lines.append(_row(p.stage, p.choice, p.budget, unit, mark="*"))
    option = meta.get("recommended")
    if option is None:
        lines.append("recommended: none, a stage fits at no micro-batch")
        return "\n".join(lines)
    strategy, ac = option.split("+")[0], option.endswith("+ac")
    lines.append(f"recommended for every stage (* = measured for it): distributed.strategy: {strategy}, "
                 f"distributed.activation_checkpointing: {str(ac).lower()}")
    for p in plans:
        lines.append(f"  stage {p.stage}: {recommendation(p, meta)}")
    return "\n".join(lines)


def recommendation(p: StagePlan, meta: dict) -> str:
    c = p.choice
    if c is None:
        return "does not fit"
    accum = meta["batch_sizes"][str(p.stage)] // p.world_size // c.micro_batch
    return (f"stage{p.stage}.micro_batch_size: {c.micro_batch} (accumulation {accum}; {size(c.peak)} of "
            f"{size(p.budget)})")


def to_json(plans: list[StagePlan], meta: dict) -> dict:
    def m_json(m: Measurement) -> dict:
        return {**asdict(m), "peak_gib": round(m.peak / GIB, 3),
                "columns_gib": {k: round(v, 3) for k, v in columns(m).items()}}

    return {**meta, "stages": {str(p.stage): {
        "budget": p.budget, "table": [m_json(m) for m in p.table], "probes": [m_json(m) for m in p.probes],
        "largest_fitting_micro_batch": p.largest, "recommended": m_json(p.choice) if p.choice else None,
        "recommendation": recommendation(p, meta)} for p in plans}}


def figure(plans: list[StagePlan], meta: dict, path: Path) -> Path:
    """Stacked bars per stage and option (the table, then each stage's recommendation), budget and GPU lines."""
    from eupe.plots import plt, save_figure

    bars: list[tuple[str, Measurement]] = []
    for p in plans:
        bars += [(f"s{p.stage} {m.option}\n@{m.micro_batch}", m) for m in p.table]
        if p.choice is not None:
            bars.append((f"s{p.stage} rec.\n{p.choice.option}@{p.choice.micro_batch}", p.choice))
    unit, unit_name = _unit(plans)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(bars) + 2), 4.8), dpi=100)
    bottom = [0.0] * len(bars)
    for i, col in enumerate(COLUMNS):
        vals = [columns(m, unit)[col] for _, m in bars]
        ax.bar(range(len(bars)), vals, bottom=bottom, color=f"C{i}", label=col)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(meta["gpu_memory"] / unit, color="black", lw=1, label="GPU memory")
    ax.axhline(meta["budget"] / unit, color="black", lw=1, ls="--", label="budget")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel(f"{unit_name} per GPU at the step's peak")
    ax.set_ylim(0, max(meta["gpu_memory"] / unit * 1.3, min(max(bottom), meta["gpu_memory"] / unit * 3)))
    ax.set_title(f"eupe plan: {Path(meta['config']).name}, {meta['world_size']} x {size(meta['gpu_memory'])}, "
                 f"recommended: {meta.get('recommended')}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def write(plans: list[StagePlan], meta: dict, out: str) -> dict[str, str]:
    """plan.json and plan.png under ``out`` (local or s3://)."""
    doc = to_json(plans, meta)
    files = {"json": f"{out.rstrip('/')}/plan.json", "png": f"{out.rstrip('/')}/plan.png"}
    storage.write_bytes(files["json"], (json.dumps(doc, indent=2) + "\n").encode())
    if storage.is_s3(out):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            storage.write_bytes(files["png"], figure(plans, meta, Path(tmp) / "plan.png").read_bytes())
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        figure(plans, meta, Path(out) / "plan.png")
    return files
