"""The table a pipeline run ends with (``summary.json`` next to the run's steps), read from the steps'
own ``result.json`` files: what each stage reached, the evaluation, and each exported ``.pte`` with
its parity and latency."""

from __future__ import annotations

from components.plan import export_variants, latency_runs
from components.run import PipelineRun, UnresolvedReference

STAGE_KEYS = ("first_loss", "last_loss", "steps", "images_per_s", "wall_s")
EVAL_KEYS = ("knn_top1", "seg_miou", "depth_rmse", "depth_delta1", "keypoint_pck", "fidelity")
EXPORT_KEYS = ("pte", "dtype", "parity_cosine", "bytes")
LATENCY_KEYS = ("median_ms", "p90_ms", "budget_ms", "passed")


def build_summary(run: PipelineRun) -> dict:
    if any(s.name == "ablation_report" for s in run.pipeline.steps):
        return ablation_summary(run)
    summary: dict = {"run": run.root, "run_id": run.run_id, "pipeline": run.pipeline.name, "stages": {}}
    for n in (1, 2, 3):
        try:
            r = run.result(f"train_stage{n}")
        except UnresolvedReference:  # skipped (a reused proxy) or not part of this pipeline
            continue
        summary["stages"][f"stage{n}"] = {**{k: r["metrics"][k] for k in STAGE_KEYS},
                                          **{k: r["artifacts"][k] for k in ("checkpoint", "encoder", "loss_curve")}}
    evaluation = run.result("evaluate")
    summary["provenance"] = evaluation.get("provenance")  # code, config and data digests of the evaluated run
    metrics = evaluation["metrics"]
    summary["eval"] = {k: metrics.get(k) for k in EVAL_KEYS}
    summary["chance"] = {"knn_top1": metrics.get("knn_chance")}
    try:  # every encoder side by side (the compare step; not part of every pipeline)
        compare = run.result("compare")["metrics"]
        summary["compare"] = {"rows": compare["rows"], "chance": compare["chance"],
                              "teacher_objectives": compare.get("teacher_objectives", {})}
    except UnresolvedReference:
        pass
    summary["export"], summary["latency"] = {}, {}
    for v in export_variants(run):
        from eupe import storage

        row = storage.read_json(run.result("export", v)["artifacts"]["export"])["models"][v["name"]]
        summary["export"][v["name"]] = {k: row[k] for k in EXPORT_KEYS}
    for item in latency_runs(run):
        m = run.result("latency", item)["metrics"]
        summary["latency"][item["name"]] = {"model": item["model"], "device_class": item["device_class"],
                                            **{k: m.get(k) for k in LATENCY_KEYS}}
    return summary


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _fmt(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


COMPARE_KEYS = ("knn_top1", "seg_miou", "depth_rmse", "keypoint_pck")


def compare_table(compare: dict) -> list[str]:
    """Teachers, proxy, student and a random student on the same held-out images, and what chance scores."""
    objectives = compare.get("teacher_objectives", {})
    rows = [("encoder", "px", "k-NN top1", "seg mIoU", "depth RMSE m", "keypoint PCK")]
    for name, r in compare["rows"].items():
        label = f"{name} ({objectives[name]} teacher)" if name in objectives else name
        rows.append((label, str(r.get("resolution", "")), *(_fmt(r.get(k)) for k in COMPARE_KEYS)))
    rows.append(("chance", "", *(_fmt(compare["chance"].get(k)) for k in COMPARE_KEYS)))
    return [*_table(rows), "held-out images, linear probes on frozen features (each encoder at its own resolution); "
            "chance: k-NN answering the most common class, seg every pixel the most common class, depth the mean "
            "depth. random student: the student's architecture, randomly initialised (seeded)."]


def ablation_summary(run: PipelineRun) -> dict:
    """The ablation pipeline ends with its report: the paper's table over the seeds, and its PNG."""
    from eupe import storage

    r = run.result("ablation_report")
    return {"run": run.root, "run_id": run.run_id, "pipeline": run.pipeline.name, "provenance": r.get("provenance"),
            "ablation": storage.read_json(r["artifacts"]["json"]), "plot": r["artifacts"]["plot"],
            "ablation_table": storage.read_bytes(r["artifacts"]["table"]).decode()}


def format_table(summary: dict) -> str:
    if "ablation_table" in summary:
        return summary["ablation_table"].rstrip() + f"\n\nplot: {summary['plot']}"
    rows = [("stage", "first loss", "last loss", "steps", "img/s", "checkpoint")]
    for name, s in summary["stages"].items():
        rows.append((name, f"{s['first_loss']:.4f}", f"{s['last_loss']:.4f}", str(s["steps"]),
                     f"{s['images_per_s']:.1f}", s["checkpoint"]))
    lines = _table(rows)
    chance = summary.get("chance", {})
    lines += ["", *_table([("eval metric", "value", "chance"),
                           *((k, _fmt(v), _fmt(chance[k]) if k in chance else "") for k, v in summary["eval"].items())])]
    if chance.get("knn_top1") is not None:
        lines.append("chance: the most common class's share of the held-out images.")
    if summary.get("compare"):
        lines += ["", *compare_table(summary["compare"])]
    rows = [("model", "parity cos", "MiB")]
    for name, e in summary["export"].items():
        rows.append((name, f"{e['parity_cosine']:.5f}", f"{e['bytes'] / 2**20:.2f}"))
    lines += ["", *_table(rows)]
    rows = [("latency run", "median ms", "p90 ms", "budget ms", "gate")]
    for name, lat in summary["latency"].items():
        gate = "n/a" if lat.get("passed") is None else "pass" if lat["passed"] else "FAIL"
        rows.append((name, _fmt(lat.get("median_ms")), _fmt(lat.get("p90_ms")), _fmt(lat.get("budget_ms")), gate))
    lines += ["", *_table(rows)]
    return "\n".join(lines)
