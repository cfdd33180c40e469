import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eupe.cli import build_parser, main

EUPE = str(Path(sys.executable).parent / "eupe")


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(sub, (*prefix, name))


def test_every_subcommand_has_help():
    commands = list(_subcommands(build_parser()))
    assert {("data", "synth"), ("normalize",), ("train",), ("promote",), ("lineage",)} <= set(commands)
    for cmd in commands:
        out = subprocess.run([EUPE, *cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage: eupe" in out.stdout, cmd


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A finished stage-1 run whose files must survive every bad command below."""
    from conftest import TINY_RECIPE

    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_RECIPE.format(data=tiny_data))
    assert main(["normalize", "--config", str(cfg), "--stage", "1", "--out", str(root / "norm")]) == 0
    assert main(["train", "--config", str(cfg), "--stage", "1", "--set", "stage1.iters=4",
                 "--norm", str(root / "norm" / "norm.safetensors"), "--out", str(root / "run")]) == 0
    return root, cfg


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "student.model=vit_bogus_patch16"], "unknown timm model 'vit_bogus_patch16'"),
        (["--set", "teachers.1.model=not_a_model"], "teachers.1.model: unknown timm model 'not_a_model'"),
        (["--set", "proxy.weights=/no/such/proxy.safetensors"], "checkpoint not found: /no/such/proxy.safetensors"),
        (["--init", "/no/such/stage2/model.safetensors"], "--init: checkpoint not found: /no/such/stage2/model.safetensors"),
        (["--data", "{empty}"], "no images in {empty}"),
        (["--data", "/no/such/dataset"], "dataset folder not found: /no/such/dataset"),
        (["--set", "stage1.lr=-0.001"], "config field 'stage1.lr': Input should be greater than 0"),
    ],
)
def test_bad_input_is_one_line_and_keeps_earlier_artifacts(trained, tmp_path, capsys, extra, expected):
    root, cfg = trained
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    extra = [e.format(empty=empty) for e in extra]
    expected = expected.format(empty=empty)
    before = _snapshot(root)
    code = main(["train", "--config", str(cfg), "--stage", "1", "--norm", str(root / "norm" / "norm.safetensors"),
                 "--out", str(root / "run"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and err.startswith("eupe: error: ") and "\n" not in err
    assert _snapshot(root) == before


def test_bad_input_exit_code_from_the_shell(trained):
    root, cfg = trained
    out = subprocess.run([EUPE, "normalize", "--config", str(cfg), "--stage", "1", "--set", "stage1.lr=-1",
                          "--out", str(root / "norm")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"eupe: error: {cfg}: config field 'stage1.lr': Input should be greater than 0 (got -1)"]


CRASH = "simulated crash inside torch: CUDA error: an illegal memory access was encountered"


def test_crash_mid_training_exits_1_with_the_traceback(trained, tmp_path):
    """Not a bad input but a failure inside the computation (here the optimizer step raising, as a GPU fault
    would): exit 1 with Python's traceback, no one-line `eupe: error:`, and no result.json."""
    root, cfg = trained
    script = ("import sys, torch\n"
              "from eupe.cli import main\n"
              "def crash(self, *args, **kwargs):\n"
              f"    raise RuntimeError({CRASH!r})\n"
              "torch.optim.AdamW.step = crash\n"
              "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, "train", "--config", str(cfg), "--stage", "1",
                           "--set", "stage1.iters=4", "--norm", str(root / "norm" / "norm.safetensors"), "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    err = proc.stderr
    assert "Traceback (most recent call last):" in err and f"\nRuntimeError: {CRASH}\n" in err, err[-3000:]
    assert "eupe/distill/trainer.py" in err, err[-3000:]  # raised from inside the training loop
    assert "eupe: error:" not in err
    assert not (out / "result.json").exists() and not (out / "checkpoints").exists()


def test_version_is_the_packages(capsys):
    import eupe

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"eupe {eupe.__version__}"
