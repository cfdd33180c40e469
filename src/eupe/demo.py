"""``make demo``: the whole distillation on the CPU in minutes, step by step through the CLI.

synth data -> validate (+ DVC version) -> normalize(1) -> stage 1 -> normalize(2) -> stage 2 ->
normalize(3) -> stage 3, then ``summary.json`` and a table. Each step is the same ``eupe`` subcommand a pipeline task runs.
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


def _run(argv: list[str]) -> None:
    from eupe.cli import main

    if main(argv) != 0:
        raise EupeError(f"demo step failed: eupe {' '.join(argv)}")


def run_demo(config: str | None, out: Path, overrides: list[str], data: Path | None = None, version: bool = False) -> dict:
    """``data``: where the dataset goes (default ``out/data``); ``version``: ``dvc add`` + ``dvc push`` it
    (``make demo`` versions the repository's ``data/``, tracked by ``data.dvc``)."""
    cfg_args = (["--config", config] if config else []) + [a for o in overrides for a in ("--set", o)]
    data = data or out / "data"
    _run(["data", "synth", "--out", str(data), "--num-images", str(DEMO_IMAGES), "--size", *map(str, DEMO_SIZE)])
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

    summary = {"stages": {}}
    for name, r in (("stage1", s1), ("stage2", s2), ("stage3", s3)):
        entry = {k: r["metrics"][k] for k in SUMMARY_KEYS}
        entry["checkpoint"] = r["artifacts"]["checkpoint"]
        entry["encoder"] = r["artifacts"]["encoder"]
        entry["loss_curve"] = r["artifacts"]["loss_curve"]
        summary["stages"][name] = entry
    storage.write_json(str(out / "summary.json"), summary)
    print(format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    rows = [("stage", "first loss", "last loss", "steps", "img/s", "checkpoint")]
    for name, s in summary["stages"].items():
        rows.append((name, f"{s['first_loss']:.4f}", f"{s['last_loss']:.4f}", str(s["steps"]),
                     f"{s['images_per_s']:.1f}", s["checkpoint"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_table(json.loads(Path("artifacts/demo/summary.json").read_text())))
