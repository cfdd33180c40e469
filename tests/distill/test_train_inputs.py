"""What `eupe train` refuses before building anything, and how a fresh run treats an older run's output."""

import json
import shutil

import pytest

from eupe.cli import main, one_line
from eupe.errors import EupeError


@pytest.fixture(scope="module")
def norm1(tmp_path_factory, tiny_data):
    from conftest import TINY_RECIPE

    root = tmp_path_factory.mktemp("inputs")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_RECIPE.format(data=tiny_data))
    assert main(["normalize", "--config", str(cfg), "--stage", "1", "--out", str(root / "norm1")]) == 0
    return cfg, root / "norm1" / "norm.safetensors"


def _train(cfg, norm, out, *extra):
    return main(["train", "--config", str(cfg), "--norm", str(norm), "--out", str(out), *extra])


def test_norm_of_another_stage_or_model_is_refused_in_one_line(norm1, tmp_path, capsys):
    cfg, norm = norm1
    assert _train(cfg, norm, tmp_path / "s2", "--stage", "2", "--random-proxy") == 2
    assert "has no statistics for ['proxy']" in capsys.readouterr().err
    # same target names, other widths: the statistics are not of these teachers
    assert _train(cfg, norm, tmp_path / "s1", "--stage", "1", "--set", "teachers.0.kwargs.embed_dim=64") == 2
    err = capsys.readouterr().err.strip()
    assert "pecore has feature dims (48, 48), the model gives (64, 64)" in err and "\n" not in err
    assert not (tmp_path / "s1").exists()


def test_norm_computed_for_another_stage_with_the_same_targets_is_refused(norm1, tmp_path, capsys):
    """Stages 2 and 3 both distil the proxy (same names, same widths): only the recorded stage tells
    that stage-2 statistics (one resolution) are not stage 3's (the whole pyramid)."""
    cfg, _ = norm1
    assert main(["normalize", "--config", str(cfg), "--stage", "2", "--random-proxy", "--out", str(tmp_path / "norm2")]) == 0
    capsys.readouterr()
    assert _train(cfg, tmp_path / "norm2" / "norm.safetensors", tmp_path / "s3", "--stage", "3", "--random-proxy", "--from-scratch") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("was computed for stage 2, not stage 3") and "\n" not in err
    assert not (tmp_path / "s3").exists()


def test_init_with_an_encoder_of_another_shape_is_refused(norm1, tmp_path, capsys):
    cfg, norm = norm1
    assert _train(cfg, norm, tmp_path / "a", "--stage", "1", "--set", "stage1.iters=2", "--set", "stage1.warmup_iters=0") == 0
    init = next((tmp_path / "a" / "checkpoints").glob("step_*")) / "model.safetensors"
    assert _train(cfg, norm, tmp_path / "b", "--stage", "1", "--init", str(init), "--set", "proxy.kwargs.depth=3",
                  "--set", "stage1.iters=2", "--set", "stage1.warmup_iters=0") == 2
    assert "encoder weights missing or of another shape" in capsys.readouterr().err


def test_a_fresh_run_replaces_an_older_runs_checkpoints_at_its_first_save(norm1, tmp_path):
    cfg, norm = norm1
    out = tmp_path / "run"
    assert _train(cfg, norm, out, "--stage", "1", "--set", "stage1.iters=8") == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    assert _train(cfg, norm, out, "--stage", "1", "--set", "stage1.iters=4") == 0  # shorter, not --resume
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004"]
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["steps"] == 4 and result["artifacts"]["checkpoint"].endswith("step_00000004")


def test_input_flags_are_taken_literally(norm1, tmp_path, tiny_data):
    cfg, _ = norm1
    odd = tmp_path / "my data #1"
    shutil.copytree(tiny_data, odd)
    assert main(["normalize", "--config", str(cfg), "--stage", "1", "--data", str(odd), "--out", str(tmp_path / "n")]) == 0
    from eupe.distill.normalize import load_stats

    _, meta = load_stats(str(tmp_path / "n" / "norm.safetensors"))
    assert len(meta["images"]) == 32 and all(u.startswith(str(odd)) for u in meta["images"])  # not cut at '#'


def test_an_error_raised_in_a_dataloader_worker_prints_as_its_own_line():
    worker_style = EupeError("Caught EupeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                             '  File "x.py", line 1, in f\neupe.errors.EupeError: cannot read s3://b/k: NoSuchKey\n')
    assert one_line(worker_style) == "cannot read s3://b/k: NoSuchKey"
    assert one_line(EupeError("plain message")) == "plain message"
