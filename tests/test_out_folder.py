"""What ``--out`` may hold, through the real CLI: a step writes only into a new or empty folder or its own
earlier output. Pointed at a training run's folder (finished, or killed before its result.json), at a
dataset, below a file, or at a file, a step exits 2 with one line before computing, and every file there
is left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import TINY_RECIPE
from eupe.cli import main
from eupe.config import load_config
from eupe.distill import checkpoint
from eupe.export.lower import lower
from eupe.models.registry import build_model

VIT = ["student.model=vit_t", "student.img_size=64", "student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("eupe: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A .pte to time and encoder weights to export, as the steps before would leave them."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16)).eval()
    (root / "tiny.pte").write_bytes(lower(model, torch.randn(1, 3, 32, 32)).program)
    spec = load_config(None, VIT).student
    save_file({k: v.contiguous() for k, v in build_model(spec).state_dict().items()}, str(root / "encoder.safetensors"))
    return {"pte": root / "tiny.pte", "weights": root / "encoder.safetensors"}


def _training_folder(out: Path, how: str, weights: Path) -> Path:
    """A stage-3 run's folder: ``finished`` (result.json), ``killed`` (claimed, checkpoints, no result) or
    ``legacy`` (checkpoints alone, as a run killed before claims existed left it)."""
    checkpoint.save(out / "checkpoints", 4, {"w": torch.ones(3)}, {"history": {}})
    if how == "finished":
        shutil.copy(weights, out / "encoder.safetensors")
        (out / "result.json").write_text(json.dumps({"step": "train-stage3", "status": "ok", "artifacts": {}}))
    elif how == "killed":
        (out / ".eupe-step").write_text(json.dumps({"step": "train-stage3"}))
    return out


def _export(inputs: dict[str, Path], data: Path, out: Path) -> list[str]:
    return ["export", *[a for o in VIT for a in ("--set", o)], "--weights", str(inputs["weights"]), "--data", str(data),
            "--resolution", "32", "--dtype", "fp32", "--out", str(out)]


def _latency(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["latency", "--set", "latency.runs=1", "--set", "latency.warmup=0", "--pte", str(inputs["pte"]),
            "--model", "tiny", "--out", str(out)]


@pytest.mark.parametrize("how", ["finished", "killed", "legacy"])
@pytest.mark.parametrize("step", ["export", "latency"])
def test_export_and_latency_into_a_training_folder_exit_2_and_touch_nothing(
        tmp_path: Path, tiny_data: Path, inputs: dict[str, Path], capsys, step: str, how: str) -> None:
    out = _training_folder(tmp_path / "train_stage3", how, inputs["weights"])
    before = _snapshot(out)
    argv = _export(inputs, tiny_data, out) if step == "export" else _latency(inputs, out)
    assert main(argv) == 2
    err = _one_line(capsys)
    assert err.startswith(f"eupe: error: --out {out} ") and ("train-stage3" in err or "is not empty" in err), err
    assert _snapshot(out) == before


def test_a_dataset_folder_is_refused_and_an_empty_one_taken(tmp_path: Path, tiny_data: Path, inputs, capsys) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data", ignore=shutil.ignore_patterns("result.json"))  # a user's
    before = _snapshot(data)
    assert main(_latency(inputs, data)) == 2
    assert "is not empty" in _one_line(capsys) and _snapshot(data) == before
    (tmp_path / "empty").mkdir()
    assert main(_latency(inputs, tmp_path / "empty")) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["latency.json", "latency.png", "result.json"]


def test_out_below_a_file_is_one_line(tmp_path: Path, tiny_data: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["data", "scan", "--data", str(tiny_data), "--out", str(afile / "scan")]) == 2
    assert _one_line(capsys) == f"eupe: error: --out {afile}/scan: {afile} is a file, not a folder"
    assert afile.read_text() == "keep"


def test_train_into_a_file_or_below_one_is_refused_before_any_step(tmp_path: Path, tiny_data: Path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_RECIPE.format(data=tiny_data))
    assert main(["normalize", "--config", str(cfg), "--stage", "1", "--out", str(tmp_path / "norm")]) == 0
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile, afile / "run"):
        capsys.readouterr()
        assert main(["train", "--config", str(cfg), "--stage", "1", "--norm", str(tmp_path / "norm" / "norm.safetensors"),
                     "--out", str(out)]) == 2
        err = _one_line(capsys)
        assert err.startswith(f"eupe: error: --out {out}: ") and err.endswith("is a file, not a folder")
        assert afile.read_text() == "keep"


def test_a_killed_runs_temporary_files_go_with_its_next_run(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "scan"
    assert main(["data", "scan", "--data", str(tiny_data), "--out", str(out)]) == 0
    result = out / "result.json"
    result.write_text(result.read_text().replace('"ok"', '"failed"'))  # so the rerun computes
    leftovers = [out / ".data-scan.staging-99999-0123abcd", out / ".result.json.tmp-k1ll3d0x",
                 out / ".manifest.parquet.old-99999-89abcdef"]
    for p in leftovers:
        p.write_bytes(b"half")
    assert main(["data", "scan", "--data", str(tiny_data), "--out", str(out)]) == 0
    assert not [p for p in leftovers if p.exists()]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "result.json"]
