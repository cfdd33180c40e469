"""The demo's chain end to end on the tiny recipe: every step through the CLI, summary.json's shape."""

import json

from eupe.cli import main
from eupe.demo import EVAL_KEYS, SUMMARY_KEYS
from eupe.results import read_result


def test_demo_runs_every_step_and_writes_the_summary(tiny_config, tmp_path, capsys):
    out = tmp_path / "demo"
    fast = ["--set", "export.resolutions=[32]", "--set", "export.int8=false", "--set", "eval.probe_epochs=2",
            "--set", "latency.runs=3", "--set", "latency.warmup=1"]
    assert main(["demo", "--config", str(tiny_config), *fast, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["stage1", "stage2", "stage3"]
    for name, s in summary["stages"].items():
        assert {"first_loss", "last_loss", "steps", "images_per_s", "checkpoint"} <= set(s), name
        assert s["steps"] == 12 and s["images_per_s"] > 0
        assert (tmp_path / s["checkpoint"] / "model.safetensors").exists() or (out / ".." / s["checkpoint"]).exists()
    assert {"knn_top1", "seg_miou", "depth_rmse", "keypoint_pck"} <= set(summary["eval"])
    assert all(summary["eval"][k] is not None for k in ("knn_top1", "seg_miou", "depth_rmse", "keypoint_pck"))
    (name, export), = summary["export"].items()
    assert export["parity_cosine"] >= 0.999 and summary["latency"][name]["median_ms"] > 0
    for path in ("validate/validation.json", "eval/eval.json", "export/export.json", f"latency/{name}/latency.json",
                 "stage3/loss_curve.png"):
        assert (out / path).exists(), path
    table = capsys.readouterr().out
    assert "stage3" in table and "knn_top1" in table and name in table

    # every number of the summary is the step's own, read back from its result.json / export.json
    for name, s in summary["stages"].items():
        result = read_result(out / name)
        assert {k: s[k] for k in SUMMARY_KEYS} == {k: result["metrics"][k] for k in SUMMARY_KEYS}, name
        assert s["checkpoint"] == result["artifacts"]["checkpoint"] and s["encoder"] == result["artifacts"]["encoder"]
        losses = json.loads((out / name / "losses.json").read_text())["loss"]
        assert len(losses) == s["steps"] and s["first_loss"] == sum(losses[:2]) / 2  # 20% of 12 steps
    assert summary["eval"] == {k: read_result(out / "eval")["metrics"].get(k) for k in EVAL_KEYS}
    exported = json.loads((out / "export" / "export.json").read_text())["models"][name]
    assert export == {k: exported[k] for k in ("pte", "dtype", "parity_cosine", "bytes")}
    timed = read_result(out / "latency" / name)["metrics"]
    assert summary["latency"][name] == {k: timed.get(k) for k in ("median_ms", "p90_ms", "budget_ms", "passed")}
    runs = json.loads((out / "latency" / name / "latency.json").read_text())["runs_ms"]
    assert len(runs) == 3 and timed["median_ms"] == sorted(runs)[1]  # 3 timed runs: the middle one
