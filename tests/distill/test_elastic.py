"""A lost worker is not a lost run (issue: real scale, item 3): torchrun with a c10d rendezvous and
--max-restarts restarts the worker group when one worker dies; with --resume auto (what the pipelines and the
chart's PyTorchJob pass) it continues from the last checkpoint and ends as an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import _free_port
from runs import (BIN, RESUME_EVERY, TIMEOUT_S, _descendants, assert_same_run, finish, latest_step, recipe,  # noqa: F401
                  spawn, stage2_args, stage2_norm)

ITERS = 3 * RESUME_EVERY


def elastic(*argv: object) -> list[object]:
    """torchrun as the chart's PyTorchJob runs it (elasticPolicy: c10d rendezvous, --max-restarts)."""
    return [BIN / "torchrun", "--nnodes", "1", "--nproc-per-node", 2, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "eupe-test", "--max-restarts", 2,
            "--monitor-interval", "0.5", "-m", "eupe.cli", *argv]


def _workers(pid: int) -> list[int]:
    """The training processes torchrun started (python -m eupe.cli), not the agent itself."""
    found = []
    for child in _descendants(pid):
        try:
            cmd = open(f"/proc/{child}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"eupe.cli" in cmd and b"torchrun" not in cmd[1]:
            found.append(child)
    return found


def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(recipe, stage2_norm, tmp_path, spawn):
    whole, hit = tmp_path / "whole", tmp_path / "hit"
    args = lambda out: stage2_args(recipe, stage2_norm, out, ITERS, "--resume", "auto")  # noqa: E731
    reference = spawn(elastic(*args(whole)), tmp_path / "whole.log")
    victim = spawn(elastic(*args(hit)), tmp_path / "hit.log")
    deadline = time.monotonic() + TIMEOUT_S
    while latest_step(hit) < RESUME_EVERY:
        assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "hit.log").read_text()[-3000:]
        time.sleep(0.02)
    workers = _workers(victim.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one worker of the two dies, as with a lost node
    finish(victim, tmp_path / "hit.log")
    finish(reference, tmp_path / "whole.log")
    log = (tmp_path / "hit.log").read_text()
    assert "failed (exitcode: -9) local_rank: 1" in log and log.count(f"resumed from {hit}/checkpoints/step_") == 2, \
        log[-3000:]  # the agent saw the worker die and both workers of the new group resumed
    result = json.loads((hit / "result.json").read_text())["metrics"]
    assert 0 < result["steps_this_run"] < ITERS, result  # the restarted group resumed from a checkpoint
    assert_same_run(hit, whole, ITERS)
