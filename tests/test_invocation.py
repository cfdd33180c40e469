"""The quick up-to-date check (eupe.invocation): a rerun of the same command with the same inputs, config
file and code returns before anything heavy is imported; any change falls through to the step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eupe.cli import main
from eupe.data.synth import synthesize
from eupe.invocation import up_to_date


@pytest.fixture()
def scanned(tmp_path: Path) -> tuple[list[str], Path]:
    data, out = tmp_path / "data", tmp_path / "scan"
    synthesize(data, 8, size=32, num_classes=2)
    argv = ["data", "scan", "--data", str(data), "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    return argv, out


def _finished_at(out: Path) -> str:
    return json.loads((out / "result.json").read_text())["finished_at"]


def test_the_invocation_is_recorded_and_a_rerun_does_nothing(scanned, capsys) -> None:
    argv, out = scanned
    result = json.loads((out / "result.json").read_text())
    assert result["invocation"]["argv"] == argv and result["invocation"]["config_digest"] is None
    before = (out / "result.json").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert "eupe data scan: up to date" in capsys.readouterr().out
    assert (out / "result.json").read_bytes() == before


def test_the_quick_path_imports_no_torch(scanned) -> None:
    argv, out = scanned
    code = ("import sys; from eupe.cli import main; rc = main(%r); "
            "print(rc, 'torch' in sys.modules)" % argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-2:] == ["0", "False"], proc.stdout + proc.stderr


def test_changed_input_argv_or_missing_artifact_falls_through(scanned, tmp_path: Path) -> None:
    argv, out = scanned
    assert up_to_date(str(out), argv, None) is not None
    assert up_to_date(str(out), [*argv[:-1], "2"], None) is None  # another command line
    image = next((tmp_path / "data").rglob("*.jpg"))
    original = image.read_bytes()
    image.write_bytes(original[:-10] + b"0123456789")  # same size, other content (the listing has the mtime)
    assert up_to_date(str(out), argv, None) is None
    first = _finished_at(out)
    assert main(argv) == 0 and json.loads((out / "result.json").read_text())["status"] == "ok"
    assert up_to_date(str(out), argv, None) is not None
    (out / "manifest.parquet").unlink()
    assert up_to_date(str(out), argv, None) is None
    assert main(argv) == 0 and (out / "manifest.parquet").is_file()
    assert _finished_at(out) >= first


def test_a_changed_config_file_falls_through(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("name: a\n")
    out = tmp_path / "o"
    out.mkdir()
    argv = ["evaluate", "--config", str(config), "--out", str(out)]
    from eupe import invocation

    recorded = invocation.record(argv, str(config))
    (out / "result.json").write_text(json.dumps({
        "step": "evaluate", "status": "ok", "artifacts": {}, "invocation": recorded,
        "fingerprint": {"code": __import__("eupe.fingerprint").fingerprint.code_digest(), "inputs": {}}}))
    assert up_to_date(str(out), argv, str(config)) is not None
    config.write_text("name: b\n")
    assert up_to_date(str(out), argv, str(config)) is None
    (out / "result.json").write_text("{not json")
    assert up_to_date(str(out), argv, str(config)) is None  # never raises: any doubt runs the step
