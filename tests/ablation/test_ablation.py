"""``eupe ablation run`` / ``report`` on the tiny recipe: every arm is a chain of real steps (normalize, train,
evaluate) with the right wiring, the report is the paper's table shape with a PNG, a rerun is up to date, and a
bad input is one line. The numbers themselves mean nothing at 4 iterations: the effect is measured by
``make ablation`` on the demo recipe with its trained teacher zoo (README, "The paper's ablation")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import pipeline_workspace
from eupe import storage
from eupe.cli import main

pytestmark = pytest.mark.slow

TA = "ablation: {seeds: [0, 1], ta: {model: vit_t, img_size: 32, kwargs: {embed_dim: 56, depth: 2, num_heads: 2}}}\n"
FAST = ["--set", "stage1.iters=4", "--set", "stage2.iters=4", "--set", "stage3.iters=4"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    config = pipeline_workspace(root)
    config.write_text(config.read_text() + TA)
    out = root / "seed0"
    assert main(["ablation", "run", "--config", str(config), *FAST, "--data", str(root / "data"),
                 "--seed", "0", "--out", str(out)]) == 0
    # a second seed's record, its numbers shifted (running every arm twice would double the test's time)
    other = json.loads((out / "ablation.json").read_text())
    other["seed"] = 1
    for row in other["arms"].values():
        row["knn_top1"] += 0.1
    (root / "seed1").mkdir()
    (root / "seed1" / "ablation.json").write_text(json.dumps(other))
    return root, config, [out, root / "seed1"]


def test_every_arm_is_a_chain_of_real_steps_with_the_right_inputs(ablation):
    root, _, (run, _) = ablation
    record = json.loads((run / "ablation.json").read_text())
    assert list(record["arms"]) == ["direct", "proxy", "full", "ta"] and record["seed"] == 0
    assert {a: r["row"] for a, r in record["arms"].items()} == {
        "direct": "stage 2 only", "proxy": "stages 1+2", "full": "stages 1+2+3", "ta": "1+2 via TA"}
    for arm, row in record["arms"].items():
        ev = storage.read_result(run / row["evaluate"])
        assert ev["step"] == "evaluate" and ev["metrics"]["knn_top1"] == row["knn_top1"], arm
    # direct: stage 1's machinery with the student in the proxy's place, on stage 2's resolution
    direct = storage.read_result(run / "direct" / "train")
    assert direct["step"] == "train-stage1" and direct["metrics"]["steps"] == 4
    argv = direct["invocation"]["argv"]
    assert any(a.startswith("proxy=") and '"vit_t"' in a for a in argv) and "stage1.resolutions=[32]" in argv
    # full: stage 3 starts from the proxy arm's stage-2 checkpoint and distils the proxy arm's proxy
    full = storage.read_result(run / "full" / "train_stage3")["invocation"]["argv"]
    stage2 = storage.read_result(run / "proxy" / "train_stage2")["artifacts"]["checkpoint_model"]
    proxy = storage.read_result(run / "proxy" / "train_stage1")["artifacts"]["encoder"]
    assert full[full.index("--init") + 1] == stage2 and full[full.index("--proxy") + 1] == proxy
    # ta: the assistant learns from the proxy, the student only from the assistant
    assistant = storage.read_result(run / "ta" / "train_assistant")
    student = storage.read_result(run / "ta" / "train_student")["invocation"]["argv"]
    assert student[student.index("--proxy") + 1] == assistant["artifacts"]["encoder"]
    assert any(a.startswith("proxy=") and '"embed_dim": 56' in a for a in student)
    assert all(f"seed=0" in storage.read_result(run / a / s)["invocation"]["argv"]
               for a, s in [("direct", "train"), ("proxy", "train_stage1"), ("ta", "train_student")])
    # every seed scores on one held-out set (the recipe's seed draws it): the spread is the training's, not the split's
    assert all("eval.split_seed=0" in storage.read_result(run / a / "evaluate")["invocation"]["argv"] for a in record["arms"])


def test_the_report_has_the_papers_shape_mean_std_over_seeds_and_a_png(ablation, capsys):
    root, _, runs = ablation
    out = root / "report"
    assert main(["ablation", "report", *[a for r in runs for a in ("--run", str(r))], "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| stage 2 only |" in table and "46.8 / 35.1 / 41.9" in table and "seeds [0, 1]" in table
    data = json.loads((out / "ablation.json").read_text())
    seeds = [json.loads((r / "ablation.json").read_text()) for r in runs]
    knn = data["arms"]["proxy"]["knn_top1"]
    assert knn["n"] == 2 and knn["values"] == [s["arms"]["proxy"]["knn_top1"] for s in seeds]
    assert knn["std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert knn["mean"] == pytest.approx(sum(knn["values"]) / 2)
    with Image.open(out / "ablation.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
    assert json.loads((out / "result.json").read_text())["artifacts"]["plot"] == "ablation.png"


def test_a_rerun_is_up_to_date_and_bad_inputs_are_one_line(ablation, tmp_path, capsys):
    root, config, (run, _) = ablation
    before = (run / "proxy" / "train_stage2" / "result.json").read_text()
    assert main(["ablation", "run", "--config", str(config), *FAST, "--data", str(root / "data"), "--seed", "0",
                 "--out", str(run)]) == 0
    assert capsys.readouterr().out.count("up to date") == 15  # every normalize/train/evaluate step of the 4 arms
    assert (run / "proxy" / "train_stage2" / "result.json").read_text() == before
    bad = subprocess.run([str(Path(sys.executable).parent / "eupe"), "ablation", "report", "--run", str(tmp_path),
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no ablation.json" in bad.stderr
