"""The GX project gx/: the data gate's suite is a reviewable file, code and file never drift, and expectations
people add to it run in `eupe data validate` (issue 14, item 2)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from eupe.cli import main
from eupe.config import load_config
from eupe.data.gx_suite import REPO_GX, SUITE_NAME, generate, load, suite_file
from eupe.data.synth import synthesize
from eupe.data.validate import _checks

SUITE = REPO_GX / "expectations" / f"{SUITE_NAME}.json"


def test_checked_in_suite_is_what_code_generates_from_the_default_config():
    df = pd.DataFrame({"class_ratio": [1.0], "domain_ratio": [1.0]})
    built = generate([c.expectation for c in _checks(df, load_config())])["expectations"]
    on_file = [e for e in load(SUITE)["expectations"] if "eupe_check" in (e.get("meta") or {})]
    assert on_file == json.loads(json.dumps(built)), "gx/ drifted: run python -m eupe.data.gx_suite"
    assert suite_file() == SUITE


def test_gx_opens_the_project_and_its_suite(tmp_path):
    import great_expectations as gx

    shutil.copytree(REPO_GX, tmp_path / "gx")  # GX writes store ids: never into the checkout
    suite = gx.get_context(mode="file", project_root_dir=str(tmp_path)).suites.get(SUITE_NAME)
    assert {e.meta["eupe_check"] for e in suite.expectations} >= {"decodable", "min_side", "duplicates", "outliers"}


def test_an_expectation_added_to_the_file_runs_and_can_fail_the_gate(tmp_path, monkeypatch):
    gx_dir = tmp_path / "gx"
    shutil.copytree(REPO_GX, gx_dir)
    data = load(gx_dir / "expectations" / f"{SUITE_NAME}.json")
    data["expectations"] += [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "width", "max_value": 80},
         "meta": {"name": "max_width"}, "severity": "critical"},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "label"}, "severity": "warning"}]
    (gx_dir / "expectations" / f"{SUITE_NAME}.json").write_text(json.dumps(data))
    monkeypatch.setenv("EUPE_GX_DIR", str(gx_dir))
    synthesize(tmp_path / "data", 8, size=(64, 96), seed=4, num_classes=2)
    out = tmp_path / "val"
    assert main(["data", "validate", "--data", str(tmp_path / "data"), "--out", str(out), "--workers", "1",
                 "--set", "validation.min_side=32"]) == 2
    report = json.loads((out / "validation.json").read_text())
    assert report["failed"] == ["max_width"] and report["suite"] == str(gx_dir / "expectations/eupe_data.json")
    names = {e["name"]: e for e in report["expectations"]}
    assert names["expect_column_values_to_not_be_null(label)#11"]["severity"] == "warn"
    assert names["max_width"]["column"] == "width"


def test_a_user_expectation_named_like_a_built_in_is_refused(tmp_path):
    from eupe.data.validate import _with_user_checks
    from eupe.errors import EupeError

    path = tmp_path / f"{SUITE_NAME}.json"
    path.write_text(json.dumps({"name": SUITE_NAME, "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "uri"}, "meta": {"name": "min_side"}}]}))
    checks = _checks(pd.DataFrame({"class_ratio": [None], "domain_ratio": [None]}), load_config())
    with pytest.raises(EupeError, match="min_side is a built-in"):
        _with_user_checks(checks, path)
    path.write_text("{not json")
    with pytest.raises(EupeError, match="not readable JSON"):
        _with_user_checks(checks, path)
