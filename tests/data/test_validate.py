"""The data gate: eupe data validate (Great Expectations suite, validation.json, Data Docs, plots)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from image_builders import broken_files, unusual_valid_files
from PIL import Image

from eupe.cli import main
from eupe.config import load_config
from eupe.data.folder import ImageFolder
from eupe.data.manifest import read_manifest, write_manifest
from eupe.data.synth import synthesize
from eupe.data.validate import run_validate
from eupe.errors import EupeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ordinary 'photos': 48 procedural scenes of mixed sizes >= 256 px in 4 balanced classes (read-only)."""
    root = tmp_path_factory.mktemp("photos") / "data"
    synthesize(root, 48, size=(256, 400), seed=5, num_classes=4)
    (root / "synth.json").unlink()  # a plain image folder, as a user would have it
    return root


def _copy(photos: Path, dest: Path) -> Path:
    shutil.copytree(photos, dest)
    return dest


def _report(out: Path) -> dict:
    return json.loads((out / "validation.json").read_text())


def _check(report: dict, name: str) -> dict:
    return next(e for e in report["expectations"] if e["name"] == name)


def test_ordinary_photos_pass_the_default_suite(photos, tmp_path, capsys):
    out = tmp_path / "val"
    assert main(["data", "validate", "--data", str(photos), "--out", str(out), "--workers", "2"]) == 0
    report = _report(out)
    assert report["passed"] and report["failed"] == [] and report["bad_files"] == []
    assert report["images"] == 48 and report["class_counts"] == {"circle": 12, "ring": 12, "square": 12, "triangle": 12}
    # photos of 256-400 px leave the 512 px bucket of stage 3 empty (it upsamples): a warning, not a failure
    assert "resolution_bucket_512" in report["warnings"]
    assert set(report["warnings"]) <= {"resolution_bucket_384", "resolution_bucket_512"}
    assert report["buckets"]["256"] == 48 and report["buckets"]["512"] == 0
    assert _check(report, "resolution_bucket_512") == {
        "name": "resolution_bucket_512", "severity": "warn", "success": False,
        "expectation": "expect_column_sum_to_be_between", "column": "bucket_512", "observed": 0}
    assert _check(report, "outliers")["success"] and _check(report, "class_balance")["observed"] == 1.0
    assert {e["severity"] for e in report["expectations"]} == {"fail", "warn"}
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["metrics"]["passed"]
    assert "data validation passed: 48 images" in capsys.readouterr().out


def test_broken_files_are_each_named_with_their_reason_and_the_gate_fails(photos, tmp_path, capsys):
    data = _copy(photos, tmp_path / "data")
    original = sorted((data / "ring").glob("*.jpg"))[0]
    broken = broken_files(data / "ring", original)
    valid = unusual_valid_files(data / "square")
    out = tmp_path / "val"
    assert main(["data", "validate", "--data", str(data), "--out", str(out), "--workers", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eupe: error")]
    assert len(err) == 1 and err[0].startswith("eupe: error: data validation failed: ")
    assert "decodable" in err[0] and "min_side" in err[0] and "duplicates" in err[0] and "6 bad files" in err[0]
    first = _report(out)["bad_files"][0]  # the line names one bad file and why, the report holds them all
    assert f"6 bad files, first {first['path']}: {first['reason']} (see " in err[0]

    report = _report(out)  # written before the exit
    assert not report["passed"] and set(report["failed"]) == {"decodable", "min_side", "duplicates"}
    bad = {b["path"]: b["reason"] for b in report["bad_files"]}
    for name, (path, reason) in broken.items():
        assert reason in bad.pop(str(path)), name
    assert bad == {}  # nothing else: not the original of the duplicate, not CMYK/gray/16-bit/palette/EXIF
    manifest = read_manifest(out / "manifest.parquet").set_index("uri")
    assert manifest.loc[[str(p) for p in valid.values()], "decodable"].all()
    assert _check(report, "decodable")["observed"]["unexpected_count"] == 4
    assert (out / "data_docs" / "index.html").read_text().lower().count("<html") >= 1
    assert list((out / "data_docs" / "validations").rglob("*.html"))
    for plot in ("resolution_histogram", "balance", "stats_scatter"):
        assert Path(report["plots"][plot]).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "result.json").read_text())["status"] == "failed"


def test_planted_extreme_image_is_flagged_as_an_outlier_warning(photos, tmp_path):
    data = _copy(photos, tmp_path / "data")
    white = data / "circle" / "white.png"
    Image.new("RGB", (300, 300), (255, 255, 255)).save(white)
    cfg = load_config(None)
    report = run_validate(cfg, str(data), tmp_path / "val", workers=2)
    assert report["passed"] and "outliers" in report["warnings"]  # outliers are "warn" by default
    assert [(b["path"], b["checks"]) for b in report["bad_files"]] == [(str(white), ["outliers"])]
    assert "outlier: robust z" in report["bad_files"][0]["reason"] and "contrast" in report["bad_files"][0]["reason"]

    # the same suite with outliers as "fail", from the existing manifest: the gate closes
    strict = load_config(None, ["validation.severity.outliers=fail"])
    with pytest.raises(EupeError, match=r"data validation failed: outliers; 1 bad files"):
        run_validate(strict, None, tmp_path / "strict", manifest=str(tmp_path / "val" / "manifest.parquet"))
    assert not _report(tmp_path / "strict")["passed"]


def test_class_and_domain_balance_bounds(photos, tmp_path):
    write_manifest(ImageFolder(photos), tmp_path / "manifest.parquet", workers=2, progress=False)
    df = read_manifest(tmp_path / "manifest.parquet")
    drop = df.index[df["label"] == "ring"][:9]  # ring: 3 images left, the others 12: ratio 4
    df = df.drop(drop)
    df["domain"] = ["lvd"] * (len(df) - 1) + ["in1k"]  # 38 : 1
    edited = tmp_path / "edited.parquet"
    df.to_parquet(edited)
    with pytest.raises(EupeError, match=r"data validation failed: class_balance; 0 bad files"):
        run_validate(load_config(None), None, tmp_path / "bal", manifest=str(edited))
    report = _report(tmp_path / "bal")
    assert _check(report, "class_balance")["observed"] == 4.0 and report["class_counts"]["ring"] == 3
    assert _check(report, "domain_balance")["observed"] == 38.0 and "domain_balance" in report["warnings"]
    assert report["domain_counts"] == {"in1k": 1, "lvd": 38}
    assert Path(report["plots"]["balance"]).read_bytes()[:8] == PNG_MAGIC


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "validate", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "val")]) == 2
    err = capsys.readouterr().err
    assert "no images in" in err and str(tmp_path / "empty") in err


def test_demo_recipe_passes_on_the_tiny_data(tiny_data, tiny_config, tmp_path):
    report = run_validate(load_config(tiny_config), str(tiny_data), tmp_path / "val", workers=2)
    assert report["passed"] and report["bad_files"] == []


@pytest.mark.parametrize("bad", ["not-parquet", "empty"])
def test_bad_manifest_into_an_earlier_run_keeps_it_whole(tiny_data, tiny_config, tmp_path, bad):
    """A --manifest is read before --out is touched: an earlier run's files stay byte for byte, no claim is left."""
    cfg = load_config(tiny_config)
    out = tmp_path / "val"
    run_validate(cfg, str(tiny_data), out, workers=2)
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = tmp_path / "bad.parquet"
    if bad == "empty":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from eupe.data.manifest import SCHEMA

        pq.write_table(pa.Table.from_pylist([], schema=SCHEMA), manifest)  # the columns, no row
        expected = "lists no images"
    else:
        manifest.write_text("not a parquet file")
        expected = "cannot read manifest"
    with pytest.raises(EupeError, match=expected):
        run_validate(cfg, None, out, manifest=str(manifest))
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before and not (out / ".eupe-step").exists()
