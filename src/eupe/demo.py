"""``make demo``: the whole distillation on the CPU in minutes, step by step through the CLI.

synth data -> validate (+ DVC version) -> normalize(1) -> stage 1 -> normalize(2) -> stage 2 ->
normalize(3) -> stage 3 -> evaluate -> export (.pte) -> latency, then ``summary.json`` and a table. Each step is the same ``eupe`` subcommand a pipeline task runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from eupe import storage
from eupe.errors import EupeError
from eupe.results import read_result

# The demo dataset: small procedural images of varied sizes, enough for the stage-3 pyramid.
DEMO_IMAGES = 384
DEMO_SIZE = (96, 160)
SUMMARY_KEYS = ("first_loss", "last_loss", "steps", "images_per_s", "wall_s")
EVAL_KEYS = ("knn_top1", "seg_miou", "depth_rmse", "depth_delta1", "keypoint_pck", "fidelity")
DEMO_MODEL = "demo_student"  # its row in configs/latency_budgets.yaml


def _run(argv: list[str]) -> None:
    from eupe.cli import main

    if main(argv) != 0:
        raise EupeError(f"demo step failed: eupe {' '.join(argv)}")


def run_demo(config: str | None, out: Path, overrides: list[str], data: Path | None = None, version: bool = False) -> dict:
    """``data``: where the dataset goes (default ``out/data``); ``version``: ``dvc add`` + ``dvc push`` it
    (``make demo`` versions the repository's ``data/``, tracked by ``data.dvc``)."""
    cfg_args = (["--config", config] if config else []) + [a for o in overrides for a in ("--set", o)]
    data = data or out / "data"
    _run(["data", "synth", "--out", str(data), "--num-images", str(DEMO_IMAGES), "--size", *map(str, DEMO_SIZE), "--dense"])
    _run(["data", "validate", *cfg_args, "--data", str(data), "--out", str(out / "validate")])
    if version:
        _run(["data", "version", "--path", str(data), "--out", str(out / "data_version")])
    common = [*cfg_args, "--data", str(data)]
    manifest = ["--manifest", str(out / "validate" / "manifest.parquet")]

    def stage(n: int, proxy: str | None = None, init: str | None = None) -> dict:
        norm = out / f"normalize_stage{n}"
        extra = ["--proxy", proxy] if proxy else []
        _run(["normalize", *common, *extra, *manifest, "--stage", str(n), "--out", str(norm)])
        train_out = out / f"stage{n}"
        _run(["train", *common, *extra, *(["--init", init] if init else []), "--stage", str(n),
              "--norm", str(norm / "norm.safetensors"), "--out", str(train_out)])
        return read_result(train_out)

    s1 = stage(1)
    proxy = s1["artifacts"]["encoder"]
    s2 = stage(2, proxy=proxy)
    s3 = stage(3, proxy=proxy, init=str(Path(s2["artifacts"]["checkpoint"]) / "model.safetensors"))

    # ship it: evaluate the student, export it to ExecuTorch, time the .pte against its budget
    checkpoint = str(Path(s3["artifacts"]["checkpoint"]) / "model.safetensors")
    _run(["evaluate", *common, "--encoder", "student", "--weights", s3["artifacts"]["encoder"], "--checkpoint", checkpoint,
          "--norm", str(out / "normalize_stage3" / "norm.safetensors"), "--proxy", proxy, "--out", str(out / "eval")])
    _run(["export", *common, "--encoder", "student", "--weights", s3["artifacts"]["encoder"], "--out", str(out / "export")])
    exported = storage.read_json(str(out / "export" / "export.json"))["models"]
    latency = {}
    for name, row in exported.items():
        _run(["latency", *cfg_args, "--pte", row["pte"], "--model", DEMO_MODEL, "--out", str(out / "latency" / name)])
        latency[name] = read_result(out / "latency" / name)["metrics"]

    summary: dict = {"stages": {}}
    for name, r in (("stage1", s1), ("stage2", s2), ("stage3", s3)):
        entry = {k: r["metrics"][k] for k in SUMMARY_KEYS}
        entry["checkpoint"] = r["artifacts"]["checkpoint"]
        entry["encoder"] = r["artifacts"]["encoder"]
        entry["loss_curve"] = r["artifacts"]["loss_curve"]
        summary["stages"][name] = entry
    metrics = read_result(out / "eval")["metrics"]
    summary["eval"] = {k: metrics.get(k) for k in EVAL_KEYS}
    summary["export"] = {name: {k: row[k] for k in ("pte", "dtype", "parity_cosine", "bytes")} for name, row in exported.items()}
    summary["latency"] = {name: {k: m.get(k) for k in ("median_ms", "p90_ms", "budget_ms", "passed")} for name, m in latency.items()}
    storage.write_json(str(out / "summary.json"), summary)
    print(format_table(summary))
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


def format_table(summary: dict) -> str:
    rows = [("stage", "first loss", "last loss", "steps", "img/s", "checkpoint")]
    for name, s in summary["stages"].items():
        rows.append((name, f"{s['first_loss']:.4f}", f"{s['last_loss']:.4f}", str(s["steps"]),
                     f"{s['images_per_s']:.1f}", s["checkpoint"]))
    lines = _table(rows)
    if "eval" in summary:
        lines += ["", *_table([("eval metric", "value"), *((k, _fmt(v)) for k, v in summary["eval"].items())])]
    if "export" in summary:
        rows = [("model", "parity cos", "MiB", "median ms", "p90 ms", "budget ms", "gate")]
        for name, e in summary["export"].items():
            lat = summary.get("latency", {}).get(name, {})
            gate = "n/a" if lat.get("passed") is None else "pass" if lat["passed"] else "FAIL"
            rows.append((name, f"{e['parity_cosine']:.5f}", f"{e['bytes'] / 2**20:.2f}", _fmt(lat.get("median_ms")),
                         _fmt(lat.get("p90_ms")), _fmt(lat.get("budget_ms")), gate))
        lines += ["", *_table(rows)]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_table(json.loads(Path("artifacts/demo/summary.json").read_text())))
