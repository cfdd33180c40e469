"""Every JSON a step reads from its user (a baseline eval.json, a registry's production.json or lineage) is
one line naming the file when it is not JSON text at all, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_RECIPE
from eupe.cli import main

BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd"


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("eupe: error: ") and "\n" not in err, err
    return err


def test_evaluate_with_a_binary_baseline_is_one_line_before_compute(tmp_path: Path, tiny_data: Path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_RECIPE.format(data=tiny_data))
    baseline = tmp_path / "eval.json"
    baseline.write_bytes(BINARY)
    assert main(["evaluate", "--config", str(cfg), "--baseline", str(baseline), "--out", str(tmp_path / "ev")]) == 2
    assert _one_line(capsys).startswith(f"eupe: error: --baseline: invalid JSON in {baseline}: not UTF-8 text")
    assert not (tmp_path / "ev").exists()


def test_lineage_of_a_binary_file_is_one_line(tmp_path: Path, capsys) -> None:
    pointer = tmp_path / "production.json"
    pointer.write_bytes(BINARY)
    assert main(["lineage", str(pointer)]) == 2
    assert f"invalid JSON in {pointer}: not UTF-8 text" in _one_line(capsys)
