"""Training into ``s3://`` (a real moto_server over HTTP): checkpoints are mirrored to the bucket as they are
saved, a run killed on one "node" resumes on another with an empty local cache, and ends equal bit for bit
to an uninterrupted local run; the deliverables and result.json are in the bucket."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from eupe import storage
from runs import (BIN, RESUME_EVERY, TIMEOUT_S, assert_same_weights, eupe, finish, kill_tree, recipe,  # noqa: F401
                  spawn, stage2_args, stage2_norm)

pytestmark = pytest.mark.slow

ITERS = 16


def _bucket_step(out: str) -> int:
    uri = f"{out}/checkpoints/latest.json"
    return storage.read_json(uri)["step"] if storage.exists(uri) else 0


def test_a_run_killed_on_one_node_resumes_on_another_from_the_bucket(recipe: Path, stage2_norm: Path, s3_bucket: str,
                                                                      tmp_path: Path, spawn, monkeypatch) -> None:
    out = f"s3://{s3_bucket}/runs/r1/train_stage2"
    logs = {n: tmp_path / f"{n}.log" for n in ("killed", "resumed")}
    # each "node" has an empty local cache of its own: where an s3:// run keeps its working checkpoints
    monkeypatch.setenv("EUPE_CACHE", str(tmp_path / "node-a"))
    victim = spawn([BIN / "eupe", *stage2_args(recipe, stage2_norm, out, ITERS)], logs["killed"])
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while _bucket_step(out) < RESUME_EVERY:
            assert victim.poll() is None, logs["killed"].read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket in time"
            time.sleep(0.05)
    finally:
        kill_tree(victim)
    killed_at = _bucket_step(out)
    assert killed_at < ITERS and not storage.exists(f"{out}/result.json")

    monkeypatch.setenv("EUPE_CACHE", str(tmp_path / "node-b"))  # a new pod: nothing local
    resumed = spawn([BIN / "eupe", *stage2_args(recipe, stage2_norm, out, ITERS, "--resume")], logs["resumed"])
    whole = tmp_path / "whole"
    eupe(*stage2_args(recipe, stage2_norm, whole, ITERS))
    finish(resumed, logs["resumed"])

    result = storage.read_result(out)
    assert result["status"] == "ok" and result["metrics"]["steps_this_run"] == ITERS - killed_at
    art = result["artifacts"]
    assert art["checkpoint"] == f"{out}/checkpoints/step_{ITERS:08d}"
    assert art["checkpoint_model"].startswith("s3://") and storage.exists(art["checkpoint_model"])
    local = tmp_path / "fetched"
    local.mkdir()
    (local / "encoder.safetensors").write_bytes(storage.read_bytes(art["encoder"]))
    (local / "model.safetensors").write_bytes(storage.read_bytes(art["checkpoint_model"]))
    assert_same_weights(local / "encoder.safetensors", whole / "encoder.safetensors")
    assert_same_weights(local / "model.safetensors", whole / "checkpoints" / f"step_{ITERS:08d}" / "model.safetensors")
    assert json.loads(storage.read_bytes(art["losses"])) == json.loads((whole / "losses.json").read_text())
    kept = {u.split("/checkpoints/")[1].split("/")[0] for u in storage.list_uris(f"{out}/checkpoints")}
    assert kept == {"latest.json", f"step_{ITERS - RESUME_EVERY:08d}", f"step_{ITERS:08d}"}  # pruned like local ones

    proc = spawn([BIN / "eupe", *stage2_args(recipe, stage2_norm, out, ITERS, "--resume")], tmp_path / "again.log")
    finish(proc, tmp_path / "again.log")
    assert "up to date" in (tmp_path / "again.log").read_text()


def test_normalize_into_s3_then_train_reads_its_stats_from_the_bucket(recipe: Path, s3_bucket: str, tmp_path: Path,
                                                                      capsys) -> None:
    """Every step takes an s3:// --out as a URI (not a local Path): normalize publishes there, a rerun is up
    to date without computing, and training reads the statistics back from the bucket."""
    from eupe.cli import main

    norm = f"s3://{s3_bucket}/runs/r2/normalize_stage2"
    eupe("normalize", "--config", recipe, "--stage", 2, "--random-proxy", "--out", norm)
    result = storage.read_result(norm)
    assert result["status"] == "ok" and result["artifacts"]["stats"] == f"{norm}/norm.safetensors"
    assert storage.exists(result["artifacts"]["stats"]) and not (Path.cwd() / "s3:").exists()
    capsys.readouterr()
    assert main(["normalize", "--config", str(recipe), "--stage", "2", "--random-proxy", "--out", norm]) == 0
    assert "up to date" in capsys.readouterr().out
    out = tmp_path / "train"
    eupe(*stage2_args(recipe, result["artifacts"]["stats"], out, 4))
    assert json.loads((out / "result.json").read_text())["fingerprint"]["inputs"]["norm"]["uri"].startswith("s3://")
