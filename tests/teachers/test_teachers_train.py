"""``eupe teachers train``: the zoo's weight files load as the recipe's teachers, its own numbers are recorded, a
second run is up to date, a retry reuses finished teachers, and a bad input is one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import TINY_RECIPE
from eupe.cli import main
from eupe.config import load_config
from eupe.data.synth import synthesize
from eupe.models.registry import build_model
from eupe.teachers.zoo import zoo_overrides

ZOO = ["--set", "teachers.0.train={objective: semantic, iters: 3, batch_size: 8}",
       "--set", "teachers.1.train={objective: dense, iters: 3, batch_size: 8}"]


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "data"
    synthesize(root, 24, size=(48, 64), seed=2, num_classes=3, dense=True)
    return root


def _recipe(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(data=data))
    return path


def test_the_zoo_trains_loads_is_up_to_date_and_resumes(tmp_path, dense_data, capsys, caplog):
    config, out = _recipe(tmp_path, dense_data), tmp_path / "zoo"
    argv = ["teachers", "train", "--config", str(config), *ZOO, "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["metrics"]["trained"] == ["pecore", "dinov3"]
    numbers = result["metrics"]["teachers"]
    assert numbers["pecore"]["objective"] == "semantic" and 0 <= numbers["pecore"]["heldout_accuracy"] <= 1
    assert 0 <= numbers["dinov3"]["heldout_miou"] <= 1 and numbers["dinov3"]["heldout_depth_rmse"] > 0
    printed = capsys.readouterr().out
    assert "teacher pecore (semantic" in printed and "heldout_miou" in printed

    cfg = load_config(config, [a for a in ZOO if a != "--set"])
    cfg = load_config(config, [*(a for a in ZOO if a != "--set"), *zoo_overrides(cfg, str(out))])
    for i, t in enumerate(cfg.teachers):  # the files are what `weights:` loads: the encoder alone, every key
        assert t.weights == str(out / f"{t.name}.safetensors")
        build_model(t, f"teachers.{i}")

    assert main(argv) == 0  # the same inputs: nothing to do
    assert "up to date" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["finished_at"] == result["finished_at"]

    (out / "result.json").unlink()  # a killed run (its claim, no result.json): --resume reuses the finished teachers
    (out / ".eupe-step").write_text(json.dumps({"step": "teachers"}))
    (out / "dinov3.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="eupe.teachers.train"):
        assert main([*argv, "--resume", "auto"]) == 0
    assert caplog.text.count("resumed (trained by an earlier run") == 2
    again = json.loads((out / "result.json").read_text())
    assert again["metrics"]["teachers"] == numbers and (out / "dinov3.safetensors").is_file()


def test_a_recipe_without_a_zoo_trains_nothing(tmp_path, dense_data, capsys):
    out = tmp_path / "zoo"
    assert main(["teachers", "train", "--config", str(_recipe(tmp_path, dense_data)), "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["metrics"]["trained"] == []
    assert "no teacher of the recipe has a train: block" in capsys.readouterr().out


def test_a_dense_teacher_without_masks_is_one_line_and_writes_nothing(tmp_path, tiny_data, capsys):
    out = tmp_path / "zoo"
    code = main(["teachers", "train", "--config", str(_recipe(tmp_path, tiny_data)), *ZOO, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no .mask.png labels" in err[0]
    assert not (out / "result.json").exists()


def test_data_without_masks_into_an_earlier_run_keeps_it_whole(tmp_path, dense_data, tiny_data, capsys):
    """The labelled images are read before --out is touched: an earlier run's files stay byte for byte and no
    claim is left."""
    out = tmp_path / "zoo"
    argv = ["teachers", "train", "--config", str(_recipe(tmp_path, dense_data)), *ZOO, "--out", str(out)]
    assert main(argv) == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main([*argv, "--set", f"data.root={tiny_data}"]) == 2
    assert "has no .mask.png labels" in capsys.readouterr().err
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
