"""The eupe_retrain graph end to end on the tiny recipe with the local runner (in this process): every
step, the summary read back from each step's own result.json, a promoted model, and a second run of
the same run id that finds every step up to date."""

import json
from pathlib import Path

import pytest

from components.graph import RETRAIN
from components.local import finish, run_pipeline
from components.summary import EVAL_KEYS, STAGE_KEYS
from conftest import pipeline_workspace

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A DVC repository (local-folder remote) holding a tiny dense dataset, and the tiny recipe with a teacher zoo."""
    root = tmp_path_factory.mktemp("workspace")
    config = pipeline_workspace(root, zoo=True)
    return root, config


@pytest.fixture(scope="module")
def first_run(workspace):
    root, config = workspace
    params = {"config": str(config), "dataset_uri": str(root / "data"), "model_name": "tiny",
              "latency_budget_ms": "60000"}
    run = run_pipeline(RETRAIN, str(root / "artifacts"), "t1", params, in_process=True)
    return run, params, finish(run)


def _result(run, step, item=None):
    return run.result(step, item)


def test_every_step_ran_and_the_summary_is_the_steps_own(first_run):
    run, _, summary = first_run
    assert list(summary["stages"]) == ["stage1", "stage2", "stage3"]
    for name, s in summary["stages"].items():
        r = _result(run, f"train_{name}")
        assert r["status"] == "ok" and {k: s[k] for k in STAGE_KEYS} == {k: r["metrics"][k] for k in STAGE_KEYS}
        assert s["checkpoint"] == r["artifacts"]["checkpoint"] and Path(r["artifacts"]["checkpoint_model"]).is_file()
        losses = json.loads(Path(r["artifacts"]["losses"]).read_text())["loss"]
        assert len(losses) == s["steps"] == 12 and s["first_loss"] == sum(losses[:2]) / 2  # 20% of 12 steps
    assert summary["eval"] == {k: _result(run, "evaluate")["metrics"].get(k) for k in EVAL_KEYS}
    assert all(summary["eval"][k] is not None for k in ("knn_top1", "seg_miou", "depth_rmse", "keypoint_pck"))
    labels = _result(run, "evaluate")["metrics"]["knn_chance"]  # the held-out majority share, next to k-NN
    assert summary["chance"] == {"knn_top1": labels} and 0 < labels < 1
    (name, export), = summary["export"].items()
    assert name == "student_32px_fp32" and export["parity_cosine"] >= 0.999
    (lat_name, lat), = summary["latency"].items()
    assert lat["model"] == name and lat["passed"] is True and lat["budget_ms"] == 60000
    runs = json.loads(Path(_result(run, "latency", {"name": lat_name})["artifacts"]["latency"]).read_text())["runs_ms"]
    assert len(runs) == 3 and lat["median_ms"] == sorted(runs)[1]  # 3 timed runs: the middle one
    assert (Path(run.root) / "summary.json").is_file()


def test_the_run_ends_with_a_promoted_model_and_its_lineage(first_run, workspace):
    run, _, _ = first_run
    root, _ = workspace
    pointer = json.loads((root / "artifacts" / "models" / "tiny" / "production.json").read_text())
    assert pointer["version"] == 1 and pointer["run_id"] == "t1"
    lineage = json.loads(Path(pointer["lineage"]).read_text())
    assert lineage["dataset"]["hash"] == _result(run, "version_data")["metrics"]["hash"]
    # the teacher zoo this run trained, then each stage's last checkpoint, pushed to the data's remote
    versioned = ["teachers", *[f"train_stage{i}" for i in (1, 2, 3)]]
    assert [c["hash"] for c in lineage["checkpoints"]] == [
        _result(run, "version_checkpoints", {"name": s})["metrics"]["hash"] for s in versioned]
    assert all(c["hash"].endswith(".dir") and c["dvc_file"].endswith("checkpoint.dvc") for c in lineage["checkpoints"])
    md5 = lineage["checkpoints"][-1]["hash"].removesuffix(".dir")
    assert (root / "remote" / "files" / "md5" / md5[:2] / (md5[2:] + ".dir")).is_file()
    assert _result(run, "promote")["metrics"]["published"] is True
    assert _result(run, "evaluate")["metrics"].get("gate_passed") is None  # first run: no production to beat


def test_a_second_run_of_the_same_run_finds_every_step_up_to_date(first_run):
    run, params, _ = first_run
    steps = [s.name for s in RETRAIN.steps if s.expand is None and s.name != "promote"]
    before = {s: _result(run, s)["finished_at"] for s in steps}
    again = run_pipeline(RETRAIN, run.artifact_root, "t1", params, in_process=True)
    assert {s: _result(again, s)["finished_at"] for s in steps} == before  # nothing was rewritten
    assert _result(again, "promote")["metrics"]["already_production"] is True



def test_the_summary_compares_teachers_proxy_student_and_a_random_student(first_run):
    run, _, summary = first_run
    compare = summary["compare"]
    rows, chance = compare["rows"], compare["chance"]
    assert list(rows) == ["pecore", "dinov3", "proxy", "student", "random student"]
    assert compare["teacher_objectives"] == {"pecore": "semantic", "dinov3": "dense"}
    assert rows["random student"]["random_init"] and not any(rows[n]["random_init"] for n in ("pecore", "dinov3", "proxy",
                                                                                              "student"))
    assert rows["pecore"]["weights"].endswith("teachers/pecore.safetensors")  # the zoo, loaded
    for k in ("knn_top1", "seg_miou", "depth_rmse", "keypoint_pck"):  # the student's row is the evaluate step's
        assert rows["student"][k] == pytest.approx(summary["eval"][k], abs=1e-3)
        assert all(r[k] is not None for r in rows.values())
    assert set(chance) == {"knn_top1", "seg_miou", "depth_rmse", "keypoint_pck"} and chance["knn_top1"] > 0
    teachers = _result(run, "teachers")["metrics"]["teachers"]  # each teacher's own held-out numbers
    assert set(teachers) == {"pecore", "dinov3"} and 0 <= teachers["pecore"]["heldout_accuracy"] <= 1
    assert 0 <= teachers["dinov3"]["heldout_miou"] <= 1 and teachers["dinov3"]["heldout_depth_rmse"] > 0
    train1 = _result(run, "train_stage1")["invocation"]["argv"]  # stage 1 distilled the zoo, not random teachers
    assert train1[train1.index("--teachers") + 1] == run.out("teachers")


# The guard the teacher zoo is for (the proxy inherits both teachers, the student beats a random student) needs
# budgets this tiny workspace does not have: tests/recipe/test_transfer.py runs it on the demo recipe.
