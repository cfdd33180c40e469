"""README's resume claims, each through the real ``eupe`` CLI in subprocesses:

* a 2-rank ``torchrun`` (gloo) run SIGKILLed after its first checkpoint and resumed under torchrun
  equals an uninterrupted 2-rank run bit for bit;
* ranks that see different checkpoints refuse to start, each with the same one line, training nothing;
* a run on WebDataset ``.tar`` shards, killed and resumed, equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from eupe.data.folder import ImageFolder
from eupe.data.sources import write_shards
from eupe.results import read_result
from eupe.step import CLAIM_FILE
from runs import (BIN, RESUME_EVERY, assert_same_run, eupe, finish, kill_after_first_checkpoint, recipe,  # noqa: F401
                  spawn, stage2_args, stage2_norm)

pytestmark = pytest.mark.slow

DDP_ITERS = 24  # steps are cheap next to start-up: room for the kill to land after step 4 on a loaded machine
SHARD_ITERS = 24


def _torchrun(*argv: object) -> list[object]:
    return [BIN / "torchrun", "--standalone", "--nproc_per_node", 2, *argv]


def test_two_rank_torchrun_killed_and_resumed_matches_uninterrupted_run(recipe: Path, stage2_norm: Path,
                                                                        tmp_path: Path, spawn) -> None:
    # Drop path: every rank draws from its global torch RNG at every step, which the resume must restore.
    def ddp(out: Path, *more: object) -> list[object]:
        return _torchrun("-m", "eupe.cli", *stage2_args(recipe, stage2_norm, out, DDP_ITERS,
                                                        "--set", "student.kwargs.drop_path_rate=0.2", *more))

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    logs = {name: tmp_path / f"{name}.log" for name in ("whole", "killed", "resumed")}
    reference = spawn(ddp(whole), logs["whole"])
    victim = spawn(ddp(killed), logs["killed"])
    killed_at = kill_after_first_checkpoint(victim, killed, logs["killed"], DDP_ITERS)  # torchrun and both ranks

    resumed = spawn(ddp(killed, "--resume"), logs["resumed"])
    finish(resumed, logs["resumed"])
    finish(reference, logs["whole"])

    m = read_result(killed)["metrics"]
    assert (m["world_size"], m["steps_this_run"]) == (2, DDP_ITERS - killed_at), "did not resume from the checkpoint"
    assert read_result(whole)["metrics"]["world_size"] == 2
    assert_same_run(killed, whole, DDP_ITERS)


def test_ranks_with_different_checkpoints_refuse_to_start(recipe: Path, stage2_norm: Path, tmp_path: Path,
                                                          spawn) -> None:
    """Each rank resumes from its own folder (a relative --out, one working directory per rank): rank 0's
    holds the checkpoint of step 4, rank 1's none. Both must fail on the same one line, before any step."""
    iters = 2 * RESUME_EVERY
    eupe(*stage2_args(recipe, stage2_norm, tmp_path / "done", iters))  # the same run: its checkpoints fit
    base = tmp_path / "ranks"
    step = f"step_{RESUME_EVERY:08d}"  # the first of two: without latest.json, the newest complete one
    shutil.copytree(tmp_path / "done" / "checkpoints" / step, base / "rank0" / "run" / "checkpoints" / step)
    (base / "rank0" / "run" / CLAIM_FILE).write_text('{"step": "train-stage2"}')  # as the killed run left it
    (base / "rank1" / "run").mkdir(parents=True)
    # each rank's stderr (log lines, then the error) to its own file; torchrun's summary to the log
    train = " ".join(f"'{a}'" for a in stage2_args(recipe, stage2_norm, "run", iters, "--resume"))
    script = f'cd {base}/rank$LOCAL_RANK && exec {BIN / "eupe"} {train} 2>stderr.txt'
    log = tmp_path / "torchrun.log"
    proc = spawn(_torchrun("--monitor-interval", 1, "--no-python", "bash", "-c", script), log)
    finish(proc, log, expect=1)  # torchrun exits 1 when its workers fail (ChildFailedError), whatever their codes

    summary = log.read_text()
    for rank in (0, 1):
        err = (base / f"rank{rank}" / "stderr.txt").read_text().splitlines()
        errors = [line for line in err if line.startswith("eupe: error:")]
        assert len(errors) == 1, err[-5:]
        assert re.search(r"ranks disagree on the step to resume from\b.*\b0\b.*\b4\b", errors[0]), errors
        assert errors[0] == err[-1] and not any("Traceback" in line for line in err), err[-5:]
        # each refused on its own, with the bad-input code 2; once the first has exited, torchrun's monitor may
        # stop the other (SIGTERM) while it shuts down: only after its error line, the last of its stderr (above)
        code = re.search(rf"rank      : {rank} \(local_rank: {rank}\)\n  exitcode  : (-?\d+) ", summary)
        assert code and code.group(1) in ("2", "-15"), summary[-3000:]
        assert not (base / f"rank{rank}" / "run" / "result.json").exists()
    root = summary.partition("Root Cause (first observed failure):")[2].partition("=" * 20)[0]
    assert "  exitcode  : 2 " in root, summary[-3000:]  # the first to exit refused with 2, stopped by no one
    assert sorted(p.name for p in (base / "rank0" / "run" / "checkpoints").iterdir()) == [step]
    assert not (base / "rank1" / "run" / "checkpoints").exists(), "rank 1 trained"


@pytest.fixture(scope="module")
def tar_shards(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 64 tiny images as 8 WebDataset shards of 8."""
    out = tmp_path_factory.mktemp("tars") / "shards"
    write_shards(ImageFolder(tiny_data), out, per_shard=8)
    return out


def test_tar_shard_run_killed_and_resumed_matches_uninterrupted_run(recipe: Path, stage2_norm: Path, tar_shards: Path,
                                                                     tmp_path: Path, spawn) -> None:
    # A shuffle buffer smaller than the data, so that the order of the stream is the buffer's. Drop path
    # draws from the global torch RNG at every step: what a resume restores from the checkpoint, so
    # nothing else (opening the data stream, say) may draw from it.
    extra = ["--data", tar_shards, "--set", "data.shuffle_buffer=16", "--set", "student.kwargs.drop_path_rate=0.2"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    logs = {name: tmp_path / f"{name}.log" for name in ("killed", "resumed")}
    victim = spawn([BIN / "eupe", *stage2_args(recipe, stage2_norm, killed, SHARD_ITERS, *extra)], logs["killed"])
    killed_at = kill_after_first_checkpoint(victim, killed, logs["killed"], SHARD_ITERS)
    resumed = spawn([BIN / "eupe", *stage2_args(recipe, stage2_norm, killed, SHARD_ITERS, *extra, "--resume")],
                    logs["resumed"])
    eupe(*stage2_args(recipe, stage2_norm, whole, SHARD_ITERS, *extra))  # uninterrupted, here, while that one starts
    finish(resumed, logs["resumed"])

    m = read_result(killed)["metrics"]
    assert m["steps_this_run"] == SHARD_ITERS - killed_at, "did not resume from the checkpoint"
    assert m["skipped_images"] == 0  # the claim is exact only without undecodable files before the kill
    assert_same_run(killed, whole, SHARD_ITERS)


def test_opening_the_data_leaves_the_global_rng_alone(tiny_data: Path, tar_shards: Path) -> None:
    """What the shard resume above needs, in one process: starting to iterate a loader (the trainer does it
    after restoring the checkpoint's RNG) draws nothing from the global torch RNG, for streams as for folders."""
    import torch

    from eupe.data.loader import StepBatchSampler, step_loader
    from eupe.data.sources import ShardStream, stream_loader

    loaders = {
        "stream": lambda: stream_loader(ShardStream(sorted(map(str, tar_shards.glob("*.tar")))), 16, 4, 0, start_batch=3),
        "folder": lambda: step_loader(ImageFolder(tiny_data), 16, StepBatchSampler(64, 8, 4, 2, 4), 0),
    }
    for kind, make in loaders.items():
        torch.manual_seed(0)
        state = torch.get_rng_state()
        next(iter(make()))
        assert torch.equal(torch.get_rng_state(), state), f"iterating the {kind} loader drew from the global RNG"
