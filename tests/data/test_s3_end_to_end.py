"""End to end against a real S3 API (a moto_server process over HTTP, no in-process mocks):
upload a dataset with boto3, then through the CLI scan, validate, normalize and train a few steps on the
``s3://`` URI, and round-trip the dataset through a DVC remote on the same server."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from eupe.cli import main
from eupe.data.synth import synthesize

pytestmark = pytest.mark.slow


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_scan_validate_train_and_dvc_round_trip_on_s3(tmp_path, s3_server, s3_bucket, tiny_config, capsys):
    local = tmp_path / "data"
    synthesize(local, 32, size=(56, 88), seed=4, num_classes=4)
    s3 = boto3.client("s3")
    for p in sorted(f for f in local.rglob("*") if f.is_file()):
        s3.upload_file(str(p), s3_bucket, f"datasets/tiny/{p.relative_to(local).as_posix()}")
    uri = f"s3://{s3_bucket}/datasets/tiny"
    cfg = ["--config", str(tiny_config), "--set", "validation.min_side=48"]

    # scan + validate read every object through the S3 API
    assert main(["data", "scan", *cfg, "--data", uri, "--out", str(tmp_path / "scan")]) == 0
    manifest = pq.read_table(tmp_path / "scan" / "manifest.parquet").to_pandas()
    assert len(manifest) == 32 and manifest["decodable"].all()
    assert all(u.startswith(f"{uri}/") for u in manifest["uri"])
    assert main(["data", "validate", *cfg, "--data", uri, "--out", str(tmp_path / "validate")]) == 0
    report = json.loads((tmp_path / "validate" / "validation.json").read_text())
    assert report["passed"] is True and report["bad_files"] == []

    # the frozen normalization and a few training steps on the s3:// data
    assert main(["normalize", *cfg, "--data", uri, "--stage", "1", "--out", str(tmp_path / "norm")]) == 0
    assert main(["train", *cfg, "--data", uri, "--stage", "1", "--set", "stage1.iters=2", "--set", "stage1.warmup_iters=1",
                 "--norm", str(tmp_path / "norm" / "norm.safetensors"), "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "ok" and result["metrics"]["steps"] == 2

    # DVC: push the dataset to an S3 remote on the same server, lose every local copy, pull it back
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text(
        "[core]\n    no_scm = True\n    remote = s3\n"
        f"['remote \"s3\"']\n    url = s3://{s3_bucket}/dvc-store\n    endpointurl = {s3_server}\n")
    shutil.copytree(local, repo / "data")
    before = _digest(repo / "data")
    capsys.readouterr()
    assert main(["data", "version", "--path", str(repo / "data"), "--out", str(repo / "version")]) == 0
    digest = capsys.readouterr().out.strip().splitlines()[-1]
    assert digest.endswith(".dir")
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="dvc-store/").get("Contents", [])]
    assert len(stored) == 34 + 1  # every file (synth's result.json included) plus the directory listing object

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert main(["data", "pull", "--path", str(repo / "data"), "--remote", "s3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == digest
    assert _digest(repo / "data") == before
