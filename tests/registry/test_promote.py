"""``eupe promote`` / ``eupe lineage``: the model registry, on local disk and on a real moto S3 server.

The evaluations of the first test are real ``eupe evaluate`` runs (the second one gated on the
``production.json`` pointer); the other step folders are written by hand with ``write_result``, with the
fields those steps write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import save_file

from eupe import storage
from eupe.cli import main
from eupe.registry import production_baseline, read_pointer, versions
from eupe.registry.lineage import code_version
from eupe.results import read_result, write_result

PTE = "student_32px_fp32.pte"
METRICS = {"knn_top1": 0.5, "seg_miou": 0.3, "depth_rmse": 0.8, "depth_delta1": 0.6, "keypoint_pck": 0.4, "fidelity": None}


def _latency(folder: Path, pte: Path, median_ms: float, budget_ms: float) -> Path:
    """A latency folder as ``eupe latency`` writes it (the step itself is tested in tests/export; lowering even a
    tiny model costs ~15 s of compilation)."""
    passed = median_ms <= budget_ms
    report = {"pte": str(pte), "model": "tiny", "resolution": 32, "input_shape": [1, 3, 32, 32], "device": "local",
              "where": "local x86_64, 1 ExecuTorch threads", "device_class": "test-cpu", "warmup": 1, "runs": 3,
              "runs_ms": [median_ms] * 3, "median_ms": median_ms, "p90_ms": median_ms, "budget_ms": budget_ms,
              "budgets": "budgets.yaml", "passed": passed}
    storage.write_json(str(folder / "latency.json"), report)
    write_result(folder, "latency", {k: report[k] for k in ("median_ms", "p90_ms", "budget_ms", "passed", "runs")},
                 {"latency": folder / "latency.json"}, status="ok" if passed else "failed")
    return folder


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Latency folders (``ok`` within its budget, ``slow`` over it) and the exported .pte they timed."""
    root = tmp_path_factory.mktemp("steps")
    pte = root / "export" / PTE
    pte.parent.mkdir()
    pte.write_bytes(b"ET12" + bytes(range(256)) * 8)  # promote copies a .pte, it does not run it
    return {"pte": pte, "ok": _latency(root / "ok", pte, 1.5, 20.0), "slow": _latency(root / "slow", pte, 31.25, 20.0)}


def _encoder(path: Path, value: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"blocks.0.weight": torch.full((4, 4), value)}, str(path))
    return path


def _eval(folder: Path, status: str = "ok", gate: dict | None = None, **metrics: object) -> Path:
    ev = {**METRICS, **metrics, "setup": {"eval": {"tolerances": {"knn_top1": 0.01}, "allow_missing_metrics": True}}}
    if gate is not None:
        ev["gate"] = gate
    storage.write_json(str(folder / "eval.json"), ev)
    write_result(folder, "evaluate", {k: ev[k] for k in METRICS}, {"eval": folder / "eval.json"}, status=status)
    return folder


def _export(folder: Path, pte: Path, cosine: float = 0.99999, name: str = PTE, weights: str = "encoder.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(pte, folder / name)
    row = {"pte": f"/elsewhere/{name}", "dtype": "fp32", "resolution": 32, "parity_cosine": cosine, "min_cosine": 0.999,
           "passed": cosine >= 0.999}
    header = {"encoder": "student", "model": "vit_t", "weights": weights, "input": {"mean": [0.5] * 3, "std": [0.2] * 3}}
    storage.write_json(str(folder / "export.json"), {**header, "models": {name[:-4]: row}})
    write_result(folder, "export", {"models": 1, "passed": row["passed"]}, {"export": folder / "export.json"},
                 status="ok" if row["passed"] else "failed")
    return folder


def _dvc(folder: Path, md5: str, path: str) -> Path:
    write_result(folder, "data-version", {"hash": md5, "size": 10, "nfiles": 2, "remote": None},
                 {"path": path, "dvc_file": f"{path}.dvc"})
    return folder


def _inputs(tmp: Path, steps: dict[str, Path], encoder_value: float = 0.0, latency: str = "ok", **metrics: object) -> list[str]:
    return ["--encoder", str(_encoder(tmp / "train/encoder.safetensors", encoder_value)),
            "--eval", str(_eval(tmp / "eval", **metrics)), "--export", str(_export(tmp / "export", steps["pte"])),
            "--latency", str(steps[latency])]


def _promote(capsys: pytest.CaptureFixture[str], registry: str, out: str, *argv: str, code: int = 0) -> str:
    capsys.readouterr()
    assert main(["promote", "--name", "vit_t", "--registry", registry, *argv, "--out", out]) == code
    captured = capsys.readouterr()
    if code:
        err = captured.err.strip()
        assert err.startswith("eupe: error: ") and "\n" not in err, err
        return err
    return captured.out


def _s3_keys(bucket: str, prefix: str) -> list[str]:
    resp = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for o in resp.get("Contents", []))


def test_local_publish_pointer_moves_and_evaluate_gates_on_the_pointer(
        tmp_path: Path, steps: dict[str, Path], tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import TINY_RECIPE

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_RECIPE.format(data=tiny_data))
    evaluate = ["evaluate", "--config", str(cfg), "--set", "eval.allow_missing_metrics=true"]
    assert main([*evaluate, "--out", str(tmp_path / "eval1")]) == 0  # a real evaluation, no production yet
    registry = tmp_path / "registry"
    assert production_baseline(str(registry), "vit_t") is None
    encoder = _encoder(tmp_path / "stage3/encoder.safetensors")
    export = _export(tmp_path / "export", steps["pte"])
    data, ckpt = _dvc(tmp_path / "dv", "d41d8cd98f00b204e9800998ecf8427e.dir", "data"), _dvc(tmp_path / "cv", "c0ffee.dir", "ckpts")
    common = ["--encoder", str(encoder), "--export", str(export), "--latency", str(steps["ok"]), "--data-version", str(data),
              "--checkpoint-version", str(ckpt), "--config", str(cfg), "--set", "eval.probe_epochs=3", "--run-id", "run-1"]
    out = _promote(capsys, str(registry), str(tmp_path / "p1"), *common, "--eval", str(tmp_path / "eval1"))
    assert "vit_t version 1" in out and "first version" in out
    v1 = registry / "models/vit_t/1"
    assert sorted(p.name for p in v1.iterdir()) == sorted(
        ["_SUCCESS", "encoder.safetensors", PTE, "eval.json", "export.json", "latency_student_32px_fp32_test-cpu.json",
         "config.yaml", "lineage.json"])
    assert (v1 / "encoder.safetensors").read_bytes() == encoder.read_bytes()
    assert (v1 / PTE).read_bytes() == steps["pte"].read_bytes()
    pointer = json.loads((registry / "models/vit_t/production.json").read_text())
    assert pointer["version"] == 1 and pointer["uri"] == str(v1) and pointer["eval"] == str(v1 / "eval.json")
    assert pointer["run_id"] == "run-1" and pointer["promoted_at"].endswith("Z") and pointer["name"] == "vit_t"
    assert production_baseline(str(registry), "vit_t") == str(v1 / "eval.json")
    result = read_result(tmp_path / "p1")
    assert result["status"] == "ok" and result["metrics"]["version"] == 1 and result["artifacts"]["version"] == str(v1)

    # The next run's quality gate reads the pointer: same seed, same numbers, the gate passes.
    pointer_uri = str(registry / "models/vit_t/production.json")
    assert main([*evaluate, "--baseline", pointer_uri, "--out", str(tmp_path / "eval2")]) == 0
    gated = json.loads((tmp_path / "eval2/eval.json").read_text())["gate"]
    assert gated["passed"] and gated["baseline"] == pointer_uri and gated["checks"]
    out = _promote(capsys, str(registry), str(tmp_path / "p2"), *common, "--eval", str(tmp_path / "eval2"))
    assert "vit_t version 2" in out and "was version 1" in out
    assert versions(str(registry), "vit_t") == [1, 2] and read_pointer(pointer_uri)["version"] == 2
    assert json.loads((v1 / "lineage.json").read_text())["version"] == 1  # the old version stays as it was

    # Lineage reads back, from the pointer and from the version folder.
    capsys.readouterr()
    assert main(["lineage", pointer_uri]) == 0
    text = capsys.readouterr().out
    record = json.loads((registry / "models/vit_t/2/lineage.json").read_text())
    for expected in ("version 2", "d41d8cd98f00b204e9800998ecf8427e.dir", "c0ffee.dir", f"sha256:{record['config']['sha256']}",
                     "tiny", "--set eval.probe_epochs=3", "eupe 0.1.0", "run-1", record["promoted_at"], "knn_top1"):
        assert expected in text, expected
    commit = code_version()["git_commit"]
    assert commit is None or commit in text
    assert main(["lineage", str(registry / "models/vit_t/2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == record
    assert record["dataset"]["hash"] == "d41d8cd98f00b204e9800998ecf8427e.dir" and record["previous"] == 1
    assert record["files"][PTE]["sha256"] and record["inputs"]["eval"] == str(tmp_path / "eval2")


def test_s3_publish_rerun_is_not_a_duplicate_and_lineage_reads_back(
        tmp_path: Path, steps: dict[str, Path], s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    def upload(folder: Path, prefix: str) -> str:
        for p in folder.rglob("*"):
            if p.is_file():
                boto3.client("s3").upload_file(str(p), s3_bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")
        return f"s3://{s3_bucket}/{prefix}"

    _inputs(tmp_path, steps)
    remote = ["--encoder", upload(tmp_path / "train", "run/train") + "/encoder.safetensors",
              "--eval", upload(tmp_path / "eval", "run/eval"), "--export", upload(tmp_path / "export", "run/export"),
              "--latency", upload(steps["ok"], "run/latency")]
    registry, out = f"s3://{s3_bucket}/reg", f"s3://{s3_bucket}/run/promote"
    assert "version 1" in _promote(capsys, registry, out, *remote)
    assert _s3_keys(s3_bucket, "reg/models/vit_t/") == sorted(
        ["1/_SUCCESS", "1/encoder.safetensors", f"1/{PTE}", "1/eval.json", "1/export.json",
         "1/latency_student_32px_fp32_test-cpu.json", "1/lineage.json", "production.json"])
    pointer = read_pointer(f"{registry}/models/vit_t/production.json")
    assert pointer["uri"] == f"{registry}/models/vit_t/1" and production_baseline(registry, "vit_t") == pointer["eval"]
    assert read_result(out)["metrics"]["version"] == 1

    # Same inputs again (the task retried): nothing new, the pointer stays.
    assert "already production" in _promote(capsys, registry, out, *remote)
    assert versions(registry, "vit_t") == [1] and read_pointer(f"{registry}/models/vit_t/production.json") == pointer
    assert read_result(out)["metrics"]["already_production"] is True

    # A new encoder: version 2, the pointer moves; lineage of the old version still reads back.
    encoder2 = upload(_encoder(tmp_path / "train2/encoder.safetensors", 1.0).parent, "run2/train") + "/encoder.safetensors"
    assert "version 2" in _promote(capsys, registry, out, *remote[2:], "--encoder", encoder2)
    assert read_pointer(f"{registry}/models/vit_t/production.json")["version"] == 2
    assert main(["lineage", f"{registry}/models/vit_t/1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["version"] == 1 and record["inputs"]["encoder"] == remote[1] and record["dataset"] is None


@pytest.mark.parametrize("failure", ["quality", "latency", "export", "moved"])
def test_a_failed_gate_publishes_nothing_and_keeps_production(
        failure: str, tmp_path: Path, steps: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    registry, first = str(tmp_path / "registry"), tmp_path / "first"
    _promote(capsys, registry, str(tmp_path / "p1"), *_inputs(first, steps))
    pointer = (tmp_path / "registry/models/vit_t/production.json").read_bytes()
    argv = _inputs(tmp_path / "second", steps, encoder_value=2.0)
    second = tmp_path / "second"
    if failure == "quality":  # evaluate gated against production and failed
        outcome = {"passed": False, "baseline": "prod/eval.json", "regressed": ["knn_top1"], "missing": [], "checks": [
            {"metric": "knn_top1", "value": 0.3, "baseline": 0.5, "tolerance": 0.01, "higher_is_better": True, "regressed": True}]}
        _eval(second / "eval", status="failed", gate=outcome, knn_top1=0.3)
        expected = "quality gate failed against prod/eval.json: knn_top1 dropped to 0.3000 (baseline 0.5000 - tolerance 0.01)"
    elif failure == "latency":
        argv[-1] = str(steps["slow"])
        expected = f"latency gate failed ({steps['slow']}/latency.json): {PTE} median"
    elif failure == "export":
        _export(second / "export", steps["pte"], cosine=0.9)
        expected = "export gate failed"
    else:  # never gated, or gated against an older production: promote compares with production itself
        _eval(second / "eval", knn_top1=0.45)
        expected = f"quality gate failed against {tmp_path}/registry/models/vit_t/1/eval.json: knn_top1 dropped to 0.4500"
    err = _promote(capsys, registry, str(tmp_path / "p2"), *argv, code=3)
    assert expected in err
    assert versions(registry, "vit_t") == [1]
    assert (tmp_path / "registry/models/vit_t/production.json").read_bytes() == pointer
    result = read_result(tmp_path / "p2")
    assert result["status"] == "failed" and result["metrics"]["failed_gates"] == [
        "quality" if failure == "moved" else failure] and result["metrics"]["reason"] in err


def test_bad_inputs_fail_in_one_line(tmp_path: Path, steps: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    good = _inputs(tmp_path, steps)
    registry, out = str(tmp_path / "registry"), str(tmp_path / "out")

    def fails(*changes: tuple[str, str], extra: tuple[str, ...] = ()) -> str:
        argv = list(good)
        for flag, value in changes:
            argv[argv.index(flag) + 1] = value
        err = _promote(capsys, registry, out, *argv, *extra, code=2)
        assert not (tmp_path / "registry").exists() and not (tmp_path / "out").exists()
        return err

    assert f"--eval {tmp_path}/nowhere: no result.json" in fails(("--eval", str(tmp_path / "nowhere")))
    assert "result.json is from step 'export', expected evaluate" in fails(("--eval", str(tmp_path / "export")))
    assert f"--export {tmp_path}/eval: result.json is from step 'evaluate'" in fails(("--export", str(tmp_path / "eval")))
    (tmp_path / "eval/eval.json").unlink()
    assert f"--eval {tmp_path}/eval: no eval.json" in fails()
    _eval(tmp_path / "eval")
    assert "expected latency" in fails(("--latency", str(tmp_path / "export")))
    assert "file not found" in fails(("--encoder", str(tmp_path / "missing.safetensors")))
    assert "expected the trained encoder's .safetensors" in fails(("--encoder", str(tmp_path / "eval/eval.json")))
    assert "expected data-version or data-pull" in fails(extra=("--data-version", str(tmp_path / "eval")))
    write_result(tmp_path / "dv", "data-version", {"size": 1}, {})
    assert "no DVC metrics.hash" in fails(extra=("--data-version", str(tmp_path / "dv")))
    assert "config file not found" in fails(extra=("--config", str(tmp_path / "nope.yaml")))
    unbudgeted = tmp_path / "unbudgeted"
    shutil.copytree(steps["ok"], unbudgeted)
    report = json.loads((unbudgeted / "latency.json").read_text())
    (unbudgeted / "latency.json").write_text(json.dumps({**report, "passed": None}))
    assert "measured without a budget" in fails(("--latency", str(unbudgeted)))
    (unbudgeted / "latency.json").write_text(json.dumps({**report, "pte": "/x/other.pte"}))
    assert f"times /x/other.pte, not a .pte of --export ({PTE})" in fails(("--latency", str(unbudgeted)))
    capsys.readouterr()
    assert main(["promote", "--name", "a/b", "--registry", registry, *good, "--out", out]) == 2
    assert "--name 'a/b'" in capsys.readouterr().err
    assert main(["lineage", str(tmp_path / "eval")]) == 2
    assert "not a published model version" in capsys.readouterr().err


def test_publishing_that_fails_mid_way_leaves_no_visible_version(
        tmp_path: Path, steps: dict[str, Path], s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Locally: a .pte listed by export.json is gone -> nothing under models/, the pointer stays.
    registry = str(tmp_path / "registry")
    _promote(capsys, registry, str(tmp_path / "p1"), *_inputs(tmp_path / "a", steps))
    pointer = (tmp_path / "registry/models/vit_t/production.json").read_bytes()
    argv = _inputs(tmp_path / "b", steps, encoder_value=3.0)
    (tmp_path / "b/export" / PTE).unlink()
    assert f"file not found: {tmp_path}/b/export/{PTE}" in _promote(capsys, registry, str(tmp_path / "p2"), *argv, code=2)
    assert sorted(p.name for p in (tmp_path / "registry/models/vit_t").iterdir()) == ["1", "production.json"]
    assert (tmp_path / "registry/models/vit_t/production.json").read_bytes() == pointer

    # On S3: the upload dies after its first object -> no _SUCCESS, no pointer move; the number is not reused.
    s3 = f"s3://{s3_bucket}/reg"
    _promote(capsys, s3, str(tmp_path / "p3"), *_inputs(tmp_path / "c", steps))
    client, calls = storage._client(), []
    real_upload = client.upload_file

    def flaky(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) > 1:
            from boto3.exceptions import S3UploadFailedError

            raise S3UploadFailedError("connection reset")
        real_upload(*args, **kwargs)

    monkeypatch.setattr(client, "upload_file", flaky)
    assert "cannot write" in _promote(capsys, s3, str(tmp_path / "p4"), *_inputs(tmp_path / "d", steps, 4.0), code=2)
    assert len(_s3_keys(s3_bucket, "reg/models/vit_t/2/")) == 1 and read_pointer(f"{s3}/models/vit_t/production.json")["version"] == 1
    assert main(["lineage", f"{s3}/models/vit_t/2"]) == 2
    assert "not a published model version" in capsys.readouterr().err  # lineage.json not uploaded either
    monkeypatch.undo()
    assert "version 3" in _promote(capsys, s3, str(tmp_path / "p5"), *_inputs(tmp_path / "d", steps, 4.0))
    assert versions(s3, "vit_t") == [1, 2, 3] and read_pointer(f"{s3}/models/vit_t/production.json")["version"] == 3


def test_code_version_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    record = code_version.__wrapped__()
    assert record == {"eupe": "0.1.0", "git_commit": None, "git_dirty": None}


def test_the_quality_gate_reads_a_pointer_and_names_a_bad_one(tmp_path: Path) -> None:
    from eupe.errors import EupeError
    from eupe.evaluate.gate import gated_values, read_baseline

    _eval(tmp_path / "v1")
    pointer = tmp_path / "production.json"
    pointer.write_text(json.dumps({"name": "vit_t", "version": 1, "uri": str(tmp_path / "v1"),
                                   "eval": str(tmp_path / "v1/eval.json")}))
    assert read_baseline(str(pointer)) == gated_values(METRICS)
    pointer.write_text(json.dumps({"version": 1}))
    with pytest.raises(EupeError, match=rf"^--baseline: {pointer}: not a production pointer"):
        read_baseline(str(pointer))


def test_fanned_out_exports_are_published_together(tmp_path: Path, steps: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The pipeline runs one export per resolution x dtype: each folder's .pte, one merged export.json."""
    argv = _inputs(tmp_path, steps)
    int8 = "student_32px_int8.pte"
    other = _export(tmp_path / "export_int8", steps["pte"], name=int8)
    registry = str(tmp_path / "registry")
    _promote(capsys, registry, str(tmp_path / "p1"), *argv, "--export", str(other))
    v1 = tmp_path / "registry/models/vit_t/1"
    assert (v1 / int8).is_file() and (v1 / PTE).is_file()
    published = json.loads((v1 / "export.json").read_text())
    assert {n: m["pte"] for n, m in published["models"].items()} == {PTE[:-4]: PTE, int8[:-4]: int8}
    assert published["weights"] == "encoder.safetensors"
    flipped = argv[:argv.index("--export")] + ["--export", str(other), "--export", str(tmp_path / "export")] + argv[-2:]
    assert "already production" in _promote(capsys, registry, str(tmp_path / "p2"), *flipped)

    err = _promote(capsys, registry, str(tmp_path / "p3"), *argv, "--export", str(tmp_path / "export"), code=2)
    assert f"{PTE[:-4]} ({PTE}) also exported by {tmp_path}/export" in err
    _export(tmp_path / "export_b", steps["pte"], name=int8, weights="other.safetensors")
    err = _promote(capsys, registry, str(tmp_path / "p3"), *argv, "--export", str(tmp_path / "export_b"), code=2)
    assert f"--export {tmp_path}/export_b: exported another model than {tmp_path}/export" in err
    assert versions(registry, "vit_t") == [1]


def test_an_input_file_gone_into_an_earlier_run_keeps_it_whole(tmp_path: Path, steps: dict[str, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Every file to publish is read before --out is touched: an earlier promote's folder stays byte for byte
    and no claim is left."""
    registry, out = str(tmp_path / "registry"), tmp_path / "p"
    _promote(capsys, registry, str(out), *_inputs(tmp_path / "a", steps))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = _inputs(tmp_path / "b", steps, encoder_value=3.0)
    (tmp_path / "b/export" / PTE).unlink()
    assert f"file not found: {tmp_path}/b/export/{PTE}" in _promote(capsys, registry, str(out), *argv, code=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
