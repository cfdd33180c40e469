"""The demo's chain end to end on the tiny recipe: every step through the CLI, summary.json's shape."""

import json

from eupe.cli import main


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
