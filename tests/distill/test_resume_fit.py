"""Resume and init only where they fit; SIGTERM saves a checkpoint and exits 143; counters cover the whole
run across resumes (issue: reliability, items 4, 6 and 7)."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from eupe.cli import main
from eupe.errors import EXIT_PREEMPTED
from eupe.step import CLAIM_FILE
from runs import (BIN, TIMEOUT_S, assert_same_weights, eupe, finish, latest_step, one_thread, recipe,  # noqa: F401
                  spawn, stage2_args, stage2_norm)

ITERS = 8


def _run(recipe, norm, out, *extra) -> int:
    with one_thread():
        return main([str(a) for a in stage2_args(recipe, norm, out, ITERS, *extra)])


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("eupe:")]
    assert len(errors) == 1, err[-5:]
    return errors[0]


@pytest.fixture(scope="module")
def stopped(recipe, stage2_norm, tmp_path_factory) -> Path:
    """A stage-2 run stopped at its first checkpoint (step 4 of 8): what every resume below starts from."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with one_thread():
        assert main([str(a) for a in stage2_args(recipe, stage2_norm, out, 4)]) == 0
    for name in ("result.json", "encoder.safetensors", "losses.json", "loss_curve.png"):
        (out / name).unlink()  # as if killed right after the checkpoint of step 4: the step's claim stays
    (out / CLAIM_FILE).write_text(json.dumps({"step": "train-stage2"}))
    return out


@pytest.mark.parametrize("change,named", [
    (["--set", "stage2.lr=1e-3"], "stage2.lr 0.002 -> 0.001"),
    (["--set", "seed=1"], "seed 0 -> 1"),
    (["--set", "student.kwargs.depth=3"], "student.kwargs.depth 2 -> 3"),
    ([], "stage2.iters 4 -> 8"),  # the stopped run was asked for 4 iterations: extending is a change too
])
def test_resume_after_a_config_change_is_refused_naming_the_fields(recipe, stage2_norm, stopped, tmp_path, capsys,
                                                                   change, named):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    capsys.readouterr()
    assert _run(recipe, stage2_norm, out, "--resume", *change) == 2
    err = _err(capsys)
    assert named in err and "--allow-config-change" in err, err
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004"]  # nothing lost


def test_resume_on_other_data_is_refused_naming_the_input(recipe, stage2_norm, stopped, tmp_path, tiny_data, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(stopped, out)
    shutil.copytree(tiny_data, data)
    next(p for p in sorted(data.rglob("*")) if p.parent != data and p.is_file()).unlink()
    capsys.readouterr()
    assert _run(recipe, stage2_norm, out, "--resume", "--data", data, "--allow-config-change", "stage2.iters") == 2
    err = _err(capsys)
    assert f"input data {tiny_data} -> {data}" in err, err


def test_an_allowed_change_resumes(recipe, stage2_norm, stopped, tmp_path):
    """Extending a run on purpose: --allow-config-change stage2.iters continues from step 4 to step 8."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    assert _run(recipe, stage2_norm, out, "--resume", "--allow-config-change", "stage2.iters") == 0
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["steps"] == ITERS and m["steps_this_run"] == ITERS - 4 and m["images"] == ITERS * 8


def test_a_checkpoint_of_another_shape_is_one_line(recipe, stage2_norm, stopped, tmp_path, capsys):
    """The depth change allowed on purpose: the weights do not fit; one line, not a traceback."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    capsys.readouterr()
    assert _run(recipe, stage2_norm, out, "--resume", "--set", "student.kwargs.depth=3",
                "--allow-config-change", "student.kwargs.depth,stage2.iters") == 2
    err = _err(capsys)
    assert "does not fit this model" in err and "encoder.blocks.2" in err, err


def test_init_from_a_deeper_encoder_is_refused(recipe, stage2_norm, stopped, tmp_path, capsys):
    init = stopped / "checkpoints" / "step_00000004" / "model.safetensors"  # a depth-2 student
    capsys.readouterr()
    assert _run(recipe, stage2_norm, tmp_path / "run", "--init", init, "--set", "student.kwargs.depth=1") == 2
    err = _err(capsys)
    assert "encoder weights that VisionTransformer does not have" in err and "encoder.blocks.1" in err, err


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory, tiny_data) -> Path:
    """The tiny data with 6 files that do not decode: training skips and counts them."""
    data = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(tiny_data, data)
    for i, png in enumerate([p for p in sorted(data.rglob("*")) if p.parent != data and p.is_file()][::10]):
        png.write_bytes(b"not an image %d" % i)
    return data


def test_sigterm_saves_a_checkpoint_exits_143_and_the_resumed_run_counts_the_whole_run(
        recipe, stage2_norm, broken_data, tmp_path, spawn):
    iters, every = 40, 20
    args = lambda out, *extra: [BIN / "eupe", *stage2_args(recipe, stage2_norm, out, iters, "--data", broken_data,  # noqa: E731
                                                         "--set", f"stage2.checkpoint_every={every}", *extra)]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    reference = spawn(args(whole), tmp_path / "whole.log")
    victim = spawn(args(stopped), tmp_path / "stopped.log")
    log = tmp_path / "stopped.log"
    deadline = time.monotonic() + TIMEOUT_S
    while "stage2 step 4/40" not in log.read_text():  # mid-run: the first progress line
        assert victim.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    finish(victim, log, expect=EXIT_PREEMPTED)
    text = log.read_text()
    saved = latest_step(stopped)
    assert "eupe: preempted: SIGTERM at stage2 step" in text and 0 < saved < iters and saved % every, text[-2000:]
    assert not (stopped / "result.json").exists()

    resumed = spawn(args(stopped, "--resume"), tmp_path / "resumed.log")
    finish(resumed, tmp_path / "resumed.log")
    finish(reference, tmp_path / "whole.log")
    assert_same_weights(stopped / "encoder.safetensors", whole / "encoder.safetensors")
    a = json.loads((whole / "result.json").read_text())["metrics"]
    b = json.loads((stopped / "result.json").read_text())["metrics"]
    assert a["skipped_images"] > 0 and b["skipped_images"] == a["skipped_images"]
    assert b["images"] == a["images"] == iters * 8 and b["steps_this_run"] == iters - saved
    assert b["images_per_s"] > 0 and b["train_s"] > 0


def test_a_finished_run_resumed_reports_its_rate(recipe, stage2_norm, stopped, tmp_path):
    """A finished run resumed (its result.json gone) trains no step; its rate is the run's, not 0."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    assert _run(recipe, stage2_norm, out, "--resume", "--set", "stage2.iters=4") == 0
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["steps_this_run"] == 0 and m["images"] == 32 and m["images_per_s"] > 0
