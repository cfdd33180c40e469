"""The one way a step finishes (eupe.step.StepRun), on local disk and on a real S3 API (moto_server):
staged outputs published under their names only, result.json last, a stale result dropped first, a
rerun with the same fingerprint a no-op, another step's folder refused, a killed run's leftovers removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eupe import storage
from eupe.errors import EupeError
from eupe.fingerprint import digest, fingerprint
from eupe.step import StepRun


def _run_once(out: str, fp: dict, payload: bytes = b"v1") -> dict:
    run = StepRun(out, "demo-step", fp)
    if run.done:
        return run.done
    with run.staging() as tmp:
        (tmp / "model.bin").write_bytes(payload)
        (tmp / "plots").mkdir()
        (tmp / "plots" / "a.png").write_bytes(b"png")
    return run.finish({"n": 1}, {"model": run.path("model.bin")})


def test_publishes_staged_names_only_and_writes_result_last(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = StepRun(str(out), "demo-step", {"k": 0})
    assert not out.exists()  # nothing written before the step writes
    storage.write_bytes(str(out / "checkpoints" / "step_1.bin"), b"keep me")  # its first write, outside staging ...
    assert json.loads((out / ".eupe-step").read_text()) == {"step": "demo-step"}  # ... claimed out first
    del killed  # killed: the rerun finds its checkpoint, which must survive
    result = _run_once(str(out), {"k": 1})
    assert not (out / ".eupe-step").exists()  # result.json names the step from now on
    assert result["status"] == "ok" and result["fingerprint"] == {"k": 1}
    assert (out / "model.bin").read_bytes() == b"v1" and (out / "plots" / "a.png").is_file()
    assert (out / "checkpoints" / "step_1.bin").read_bytes() == b"keep me"
    assert json.loads((out / "result.json").read_text())["artifacts"]["model"] == "model.bin"  # relative to the file
    assert storage.read_result(out)["artifacts"]["model"] == str(out / "model.bin")
    assert not list(out.glob(".demo-step.staging-*"))


def test_same_fingerprint_is_up_to_date_and_other_inputs_recompute(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first = _run_once(out, {"k": 1})
    again = _run_once(out, {"k": 1}, payload=b"never written")
    assert again["up_to_date"] is True and again["finished_at"] == first["finished_at"]
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"v1"
    other = _run_once(out, {"k": 2}, payload=b"v2")
    assert "up_to_date" not in other and (tmp_path / "out" / "model.bin").read_bytes() == b"v2"
    (tmp_path / "out" / "model.bin").unlink()  # an artifact gone: not up to date any more
    assert "up_to_date" not in _run_once(out, {"k": 2}, payload=b"v3")


def test_a_failure_drops_the_stale_result_and_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run_once(str(out), {"k": 1})
    run = StepRun(str(out), "demo-step", {"k": 2})
    assert not (out / "result.json").exists()  # a stale "ok" never outlives a crash
    with pytest.raises(RuntimeError):
        with run.staging() as tmp:
            (tmp / "model.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert (out / "model.bin").read_bytes() == b"v1" and not list(out.glob(".demo-step.staging-*"))


def test_another_steps_folder_and_a_file_are_refused_before_anything_is_touched(tmp_path: Path) -> None:
    out = tmp_path / "train"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"step": "train-stage3", "status": "ok"}))
    with pytest.raises(EupeError, match=r"holds the output of step 'train-stage3', not 'export'"):
        StepRun(str(out), "export")
    assert json.loads((out / "result.json").read_text())["step"] == "train-stage3"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(EupeError, match="is a file, not a folder"):
        StepRun(str(afile), "export")


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = f"""
import sys, time
from eupe.step import StepRun
run = StepRun({str(out)!r}, "demo-step", {{"k": 1}})
with run.staging() as tmp:
    (tmp / "model.bin").write_bytes(b"partial")
    print("staged", flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "staged"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = list(out.glob(".demo-step.staging-*"))
    assert len(leftovers) == 1 and not (out / "model.bin").exists() and not (out / "result.json").exists()
    _run_once(str(out), {"k": 1})
    assert not list(out.glob(".demo-step.staging-*")) and (out / "model.bin").read_bytes() == b"v1"


def test_the_same_mechanism_on_s3(s3_bucket: str) -> None:
    out = f"s3://{s3_bucket}/runs/r1/step"
    killed = StepRun(out, "demo-step", {"k": 0})  # killed after a write outside staging, which claimed out
    storage.write_bytes(f"{out}/checkpoints/step_1.bin", b"keep me")
    assert storage.read_json(f"{out}/.eupe-step") == {"step": "demo-step"}
    del killed
    first = _run_once(out, {"k": 1})
    assert storage.read_bytes(f"{out}/model.bin") == b"v1" and storage.read_bytes(f"{out}/plots/a.png") == b"png"
    assert storage.read_bytes(f"{out}/checkpoints/step_1.bin") == b"keep me"
    assert storage.read_json(f"{out}/result.json")["artifacts"]["model"] == "model.bin"  # relative to the file
    assert storage.read_result(out)["artifacts"]["model"] == f"{out}/model.bin"
    assert not storage.exists(f"{out}/.eupe-step")
    assert _run_once(out, {"k": 1}, payload=b"x")["finished_at"] == first["finished_at"]
    StepRun(out, "demo-step", {"k": 2})  # other inputs: the stale result goes first
    assert not storage.exists(f"{out}/result.json")


def test_fingerprint_follows_content_not_names(tmp_path: Path, s3_bucket: str) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"a")
    d1 = fingerprint("s", {"weights": str(f), "none": None})
    assert list(d1["inputs"]) == ["weights"] and d1["inputs"]["weights"]["digest"].startswith("sha256:")
    f.write_bytes(b"b")
    assert fingerprint("s", {"weights": str(f)}) != d1
    folder = tmp_path / "data"
    (folder / "c").mkdir(parents=True)
    (folder / "c" / "x.jpg").write_bytes(b"1")
    before = digest(str(folder))
    time.sleep(0.01)
    (folder / "c" / "y.jpg").write_bytes(b"2")
    assert digest(str(folder)) != before
    storage.write_bytes(f"s3://{s3_bucket}/d/x.jpg", b"1")
    one = digest(f"s3://{s3_bucket}/d/x.jpg")
    assert one.startswith("etag:") and digest(f"s3://{s3_bucket}/d/").startswith("listing:")
    with pytest.raises(EupeError, match="input not found"):
        digest(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- what --out may hold


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_no_run_of_the_step_wrote_is_refused_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    (data / "cats" / "1.jpg").write_bytes(b"jpg")
    (data / "notes.txt").write_text("mine")
    before = _snapshot(data)
    with pytest.raises(EupeError, match=r"is not empty \(cats, notes.txt\) and no run of step 'demo-step' wrote it"):
        _run_once(str(data), {"k": 1})
    assert _snapshot(data) == before and sorted(p.name for p in data.iterdir()) == ["cats", "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run_once(str(empty), {"k": 1})["status"] == "ok"  # an empty folder is fine


def test_another_steps_claim_is_refused_and_a_killed_run_of_the_same_step_continues(tmp_path: Path) -> None:
    out = tmp_path / "train"
    killed = StepRun(str(out), "train-stage1", {"k": 1})  # killed after its first checkpoint, which claimed out
    with storage.atomic_dir(out / "checkpoints" / "step_00000004") as tmp:
        (tmp / "state.pt").write_bytes(b"state")
    del killed
    before = _snapshot(out)
    assert sorted(before) == [".eupe-step", "checkpoints/step_00000004/state.pt"]
    with pytest.raises(EupeError, match=r"is being written by step 'train-stage1' \(\.eupe-step\), not 'export'"):
        StepRun(str(out), "export", {"k": 1})
    assert _snapshot(out) == before
    run = StepRun(str(out), "train-stage1", {"k": 1})  # the rerun (--resume) is its own
    assert run.done is None and _snapshot(out) == before


def test_out_below_a_file_and_an_s3_object_are_refused(tmp_path: Path, s3_bucket: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(EupeError, match=rf"--out {afile}/sub: {afile} is a file, not a folder"):
        StepRun(str(afile / "sub"), "demo-step")
    assert afile.read_text() == "x"
    storage.write_bytes(f"s3://{s3_bucket}/runs/obj", b"keep")
    with pytest.raises(EupeError, match="is an object, not a prefix"):
        StepRun(f"s3://{s3_bucket}/runs/obj", "demo-step")
    with pytest.raises(EupeError, match=r"malformed s3 URI"):
        StepRun(f"s3://{s3_bucket}//tmp/x", "demo-step")


def test_an_s3_prefix_no_run_of_the_step_wrote_is_refused_untouched(s3_bucket: str) -> None:
    out = f"s3://{s3_bucket}/datasets/lvd"
    storage.write_bytes(f"{out}/shard-000000.tar", b"tar")
    with pytest.raises(EupeError, match=r"is not empty \(shard-000000.tar\) and no run of step 'demo-step'"):
        _run_once(out, {"k": 1})
    assert storage.list_uris(out) == [f"{out}/shard-000000.tar"]


def test_every_leftover_of_a_killed_run_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run_once(str(out), {"k": 1})
    leftovers = [  # what a kill leaves at each temporary write of eupe.storage and of the staging
        out / ".demo-step.staging-4242-0123abcd" / "model.bin",  # a staging folder
        out / ".result.json.tmp-a1b2_c3d" ,  # a file half-written by storage.write_bytes (mkstemp)
        out / ".plots.old-4242-89abcdef" / "a.png",  # a folder moved aside by publish_files
        out / "checkpoints" / "step_00000008.tmp-4242-fedcba98" / "state.pt",  # a checkpoint by atomic_dir
        out / "checkpoints" / ".latest.json.tmp-zz99zz99",
    ]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    (out / "checkpoints" / "step_00000004").mkdir()
    _run_once(str(out), {"k": 2})
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "checkpoints", "checkpoints/step_00000004", "model.bin", "plots", "plots/a.png", "result.json"]


def test_a_bad_input_found_after_the_check_leaves_no_folder_behind(tmp_path: Path, s3_bucket: str) -> None:
    for out in (str(tmp_path / "new"), f"s3://{s3_bucket}/runs/new"):
        run = StepRun(out, "demo-step", {"k": 1})
        assert run.done is None and not storage.exists(out)  # e.g. a budget row missing: one line, exit 2
        del run
    assert list(tmp_path.iterdir()) == []


def test_every_result_records_its_provenance(tmp_path, monkeypatch):
    """run id (from the step runner), code version, config hash and data digests in every result.json."""
    from eupe.fingerprint import code_digest, fingerprint
    from eupe.results import write_result

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    monkeypatch.setenv("EUPE_RUN_ID", "r42")
    fp = fingerprint("s", {"data": str(data), "norm": None})
    result = write_result(tmp_path / "out", "s", {}, {}, fingerprint=fp)
    assert result["provenance"]["run_id"] == "r42" and result["provenance"]["code"] == code_digest()
    assert result["provenance"]["data"] == {"data": fp["inputs"]["data"]["digest"]}
