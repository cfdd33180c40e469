"""Helpers shared by the training tests that run ``eupe train`` for real: in this process or as
subprocesses (``eupe``, ``torchrun``), killed and resumed, compared bit for bit.

Import the fixtures (``spawn``, ``recipe``, ``stage2_norm``) into a test module to use them there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RECIPE
from eupe.cli import main

BIN = Path(sys.executable).parent  # the venv's console scripts: eupe, torchrun
RESUME_EVERY = 4  # checkpoint_every of the kill + resume runs
TIMEOUT_S = 180


@contextmanager
def one_thread() -> Iterator[None]:
    """In-process runs on one thread: OpenMP threads spin-waiting for a core that another process
    holds make tiny models tens of times slower on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eupe(*argv: object) -> None:
    """``eupe ARGV`` in this process."""
    args = [str(a) for a in argv]
    with one_thread():
        rc = main(args)
    assert rc == 0, f"eupe {' '.join(args)} failed"


def env() -> dict[str, str]:
    # One thread per process: runs that must agree bit for bit use the same reduction order, and
    # the concurrent processes of a test do not fight over a small machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything it started, at once, as a crashed node would die.

    ``proc`` runs in its own session (see ``spawn``), but torchrun starts each worker in a session of
    its own too: killing torchrun's process group alone would leave the workers training (and
    writing checkpoints). So every process group of the tree is stopped, then killed, and the call
    returns once none of them is alive."""
    pids = [proc.pid, *_descendants(proc.pid)]
    ours = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(ours)
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # stopped first: no worker outlives another by a step
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):  # the workers are not our children: wait for them to be gone
        assert time.monotonic() < deadline, f"processes {[p for p in pids if _alive(p)]} survived SIGKILL"
        time.sleep(0.01)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start a command in its own session, output to a log file; whatever still runs at teardown
    (a failed test) is killed with its children (torchrun's workers)."""
    started: list[subprocess.Popen] = []

    def start(cmd: list[object], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        with open(log, "wb") as f:  # a file, not a PIPE nobody reads: tqdm would fill it and block
            proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                    stdin=subprocess.DEVNULL, env=env(), start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            kill_tree(proc)


def finish(proc: subprocess.Popen, log: Path, expect: int = 0) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.args} still running after {TIMEOUT_S}s: {log.read_text()[-3000:]}") from None
    assert rc == expect, f"{proc.args} exited {rc}, not {expect}: {log.read_text()[-3000:]}"


def losses(out: Path) -> dict:
    return json.loads((out / "losses.json").read_text())


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), f"{a} and {b} hold different tensors"
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}: max |diff| {(ta[k] - tb[k]).abs().max()}"


def assert_same_run(a: Path, b: Path, iters: int, every: int = RESUME_EVERY) -> None:
    """Two finished runs under ``a`` and ``b`` are the same bit for bit: encoder, loss history, the kept
    checkpoints (the last two)."""
    assert_same_weights(a / "encoder.safetensors", b / "encoder.safetensors")
    kept = sorted(p.name for p in (b / "checkpoints").glob("step_*"))
    assert kept == [f"step_{s:08d}" for s in (iters - every, iters)]
    assert sorted(p.name for p in (a / "checkpoints").glob("step_*")) == kept
    for name in kept:
        assert_same_weights(a / "checkpoints" / name / "model.safetensors", b / "checkpoints" / name / "model.safetensors")
    assert losses(a) == losses(b)  # history before the kill comes back from the checkpoint


def latest_step(out: Path) -> int:
    marker = out / "checkpoints" / "latest.json"
    try:
        return json.loads(marker.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (it is replaced atomically)
        return 0


def kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, log: Path, iters: int,
                                every: int = RESUME_EVERY) -> int:
    """Wait for the run under ``out`` to save its first checkpoint, SIGKILL it (with its children), and
    return the step it can resume from; fails when the run finished before the kill."""
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while latest_step(out) < every:
            assert proc.poll() is None, f"run ended before its first checkpoint: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest_step(out)
    assert killed_at < iters and not (out / "result.json").exists(), \
        f"the run finished (step {killed_at}) before it was killed: raise its iterations"
    return killed_at


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(data=tiny_data))
    return path


@pytest.fixture(scope="module")
def stage2_norm(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage-2 statistics of a randomly initialised proxy (--random-proxy): no stage 1 needed."""
    out = tmp_path_factory.mktemp("norm2")
    eupe("normalize", "--config", recipe, "--stage", 2, "--random-proxy", "--out", out)
    return out / "norm.safetensors"


def stage2_args(recipe: Path, norm: Path, out: Path | str, iters: int, *extra: object) -> list[object]:
    """``train`` arguments of a stage-2 run checkpointing every ``RESUME_EVERY`` steps."""
    return ["train", "--config", recipe, "--stage", 2, "--random-proxy", "--norm", norm, "--out", out,
            "--set", f"stage2.iters={iters}", "--set", f"stage2.checkpoint_every={RESUME_EVERY}", *extra]
