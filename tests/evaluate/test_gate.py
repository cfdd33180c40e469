"""The quality gate: direction-aware comparison of an evaluation with a baseline eval.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eupe.config import EvalConfig, load_config
from eupe.errors import EupeError
from eupe.evaluate import gate

TOL = EvalConfig().tolerances
BASE = {"knn_top1": 0.80, "seg_miou": 0.50, "depth_rmse": 0.60, "depth_delta1": 0.70, "keypoint_pck": 0.40,
        "fidelity": {"proxy": 0.90}}


def _with(**changes: object) -> dict:
    return {**BASE, **changes}


def test_passes_without_a_regression_and_within_tolerance() -> None:
    current = _with(knn_top1=0.795, depth_rmse=0.61, fidelity={"proxy": 0.95})  # small moves, one improvement
    outcome = gate.check(current, gate.gated_values(BASE), TOL)
    assert outcome["passed"] and outcome["regressed"] == []
    assert {c["metric"] for c in outcome["checks"]} == {*BASE} - {"fidelity"} | {"fidelity.proxy"}


@pytest.mark.parametrize(("metric", "value"), [("knn_top1", 0.70), ("seg_miou", 0.45), ("keypoint_pck", 0.0),
                                               ("depth_delta1", 0.60), ("depth_rmse", 0.70)])
def test_a_planted_regression_fails_and_is_named(metric: str, value: float) -> None:
    outcome = gate.check(_with(**{metric: value}), gate.gated_values(BASE), TOL)
    assert not outcome["passed"] and outcome["regressed"] == [metric]
    message = gate.failure_message(outcome, "prod/eval.json")
    assert "\n" not in message and metric in message and "prod/eval.json" in message
    assert f"{value:.4f}" in message and f"{gate.gated_values(BASE)[metric]:.4f}" in message
    assert f"tolerance {TOL[metric]:g}" in message


def test_direction_matters_lower_rmse_and_higher_scores_are_improvements() -> None:
    better = _with(depth_rmse=0.10, knn_top1=0.99)
    assert gate.check(better, gate.gated_values(BASE), TOL)["passed"]
    worse_rmse = _with(depth_rmse=0.60 + TOL["depth_rmse"] + 1e-6)
    assert gate.check(worse_rmse, gate.gated_values(BASE), TOL)["regressed"] == ["depth_rmse"]


def test_fidelity_is_gated_per_target_and_missing_metrics_fail_by_default() -> None:
    baseline = gate.gated_values({**BASE, "fidelity": {"proxy": 0.9, "pecore": 0.8}})
    current = _with(seg_miou=None, fidelity={"proxy": 0.95, "dinov3": 0.7})  # no regression, two baseline metrics gone
    outcome = gate.check(current, baseline, TOL)
    assert not outcome["passed"] and outcome["regressed"] == []
    assert outcome["missing"] == ["fidelity.pecore", "seg_miou"] and outcome["skipped"] == ["fidelity.dinov3"]
    message = gate.failure_message(outcome, "prod/eval.json")
    assert "\n" not in message and "fidelity.pecore, seg_miou missing from this run" in message

    allowed = gate.check(current, baseline, TOL, allow_missing=True)
    assert allowed["passed"] and allowed["missing"] == []
    assert allowed["skipped"] == ["fidelity.dinov3", "fidelity.pecore", "seg_miou"]
    worse = gate.check(_with(seg_miou=None, fidelity={"proxy": 0.5}), baseline, TOL, allow_missing=True)
    assert not worse["passed"] and worse["regressed"] == ["fidelity.proxy"]
    assert load_config(None, ["eval.allow_missing_metrics=true"]).eval.allow_missing_metrics
    assert not EvalConfig().allow_missing_metrics


def test_several_regressions_are_all_named_in_one_line() -> None:
    outcome = gate.check(_with(knn_top1=0.1, depth_rmse=3.0), gate.gated_values(BASE), TOL)
    message = gate.failure_message(outcome, "b.json")
    assert outcome["regressed"] == ["depth_rmse", "knn_top1"]
    assert "depth_rmse rose to 3.0000" in message and "knn_top1 dropped to 0.1000" in message


def test_tolerances_come_from_config_and_are_validated(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.tolerances.knn_top1=0.5"])
    assert cfg.eval.tolerances["knn_top1"] == 0.5 and cfg.eval.tolerances["seg_miou"] == TOL["seg_miou"]
    assert gate.check(_with(knn_top1=0.4), gate.gated_values(BASE), cfg.eval.tolerances)["passed"]
    with pytest.raises(EupeError, match="eval.tolerances.*accuracy"):
        load_config(None, ["eval.tolerances.accuracy=0.1"])


def test_baseline_must_be_an_eval_json(tmp_path: Path) -> None:
    good = tmp_path / "eval.json"
    good.write_text(json.dumps(BASE))
    assert gate.read_baseline(str(good))["fidelity.proxy"] == 0.9
    other = tmp_path / "result.json"
    other.write_text(json.dumps({"step": "train", "metrics": {"loss": 1.0}}))
    with pytest.raises(EupeError, match=f"--baseline {other}: not an eval.json"):
        gate.read_baseline(str(other))
    with pytest.raises(EupeError, match="file not found"):
        gate.read_baseline(str(tmp_path / "missing.json"))


# --------------------------------------------------------------------------- known answers at the edges
# Values are exact binary fractions, so "a drop of exactly the tolerance" is exact in floating point.


def test_a_fidelity_drop_is_held_to_the_fidelity_tolerance() -> None:
    baseline = gate.gated_values(_with(fidelity={"proxy": 0.75, "pecore": 0.5}))
    tol = {**TOL, "fidelity": 0.125}
    inside = gate.check(_with(fidelity={"proxy": 0.6875, "pecore": 0.4375}), baseline, tol)  # both drop 0.0625
    assert inside["passed"] and inside["regressed"] == []
    by_name = {c["metric"]: c for c in inside["checks"]}
    assert by_name["fidelity.proxy"]["tolerance"] == 0.125 and by_name["fidelity.pecore"]["tolerance"] == 0.125
    outside = gate.check(_with(fidelity={"proxy": 0.5, "pecore": 0.4375}), baseline, tol)  # proxy drops 0.25
    assert not outside["passed"] and outside["regressed"] == ["fidelity.proxy"]


def test_a_fidelity_target_with_a_dot_in_its_name_is_still_a_fidelity_metric() -> None:
    baseline = gate.gated_values(_with(fidelity={"dino.v3": 0.75}))
    outcome = gate.check(_with(fidelity={"dino.v3": 0.6875}), baseline, {**TOL, "fidelity": 0.125})
    assert outcome["passed"]
    assert [c["tolerance"] for c in outcome["checks"] if c["metric"] == "fidelity.dino.v3"] == [0.125]


def test_a_drop_of_exactly_the_tolerance_passes_in_both_directions() -> None:
    baseline = gate.gated_values(_with(knn_top1=0.75, depth_rmse=0.5))
    tol = {**TOL, "knn_top1": 0.25, "depth_rmse": 0.25}
    assert gate.check(_with(knn_top1=0.5, depth_rmse=0.75), baseline, tol)["regressed"] == []
    assert gate.check(_with(knn_top1=0.49, depth_rmse=0.76), baseline, tol)["regressed"] == ["depth_rmse", "knn_top1"]


def test_a_metric_without_a_tolerance_may_not_move_at_all() -> None:
    baseline = {"knn_top1": 0.75, "depth_rmse": 0.5}
    unchanged = gate.check({"knn_top1": 0.75, "depth_rmse": 0.5}, baseline, {})
    assert unchanged["passed"] and [c["tolerance"] for c in unchanged["checks"]] == [0.0, 0.0]
    moved = gate.check({"knn_top1": 0.7499, "depth_rmse": 0.5001}, baseline, {})
    assert moved["regressed"] == ["depth_rmse", "knn_top1"]


def test_failure_message_spells_out_value_baseline_sign_and_tolerance() -> None:
    baseline = {"knn_top1": 0.75, "depth_rmse": 0.5, "seg_miou": 0.5}
    outcome = gate.check({"knn_top1": 0.25, "depth_rmse": 1.0}, baseline, {"knn_top1": 0.125, "depth_rmse": 0.0625})
    assert gate.failure_message(outcome, "prod/eval.json") == (
        "quality gate failed against prod/eval.json: "
        "depth_rmse rose to 1.0000 (baseline 0.5000 + tolerance 0.0625); "
        "knn_top1 dropped to 0.2500 (baseline 0.7500 - tolerance 0.125); "
        "seg_miou missing from this run but present in the baseline (eval.allow_missing_metrics=true skips them)"
    )


def test_a_baseline_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    listed = tmp_path / "eval.json"
    listed.write_text(json.dumps([BASE]))
    with pytest.raises(EupeError, match=f"--baseline {listed}: not an eval.json"):
        gate.read_baseline(str(listed))


def test_a_production_pointer_baseline_is_the_eval_json_it_points_to(tmp_path: Path) -> None:
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "eval.json").write_text(json.dumps({"knn_top1": 0.625, "fidelity": {"proxy": 0.5}}))
    pointer = tmp_path / "production.json"
    pointer.write_text(json.dumps({"name": "vit_t", "version": 3, "uri": str(tmp_path / "v3"),
                                   "eval": str(tmp_path / "v3" / "eval.json")}))
    assert gate.read_baseline(str(pointer)) == {"knn_top1": 0.625, "fidelity.proxy": 0.5}
