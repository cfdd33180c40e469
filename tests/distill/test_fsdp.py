"""Sharded training (issue: real scale, item 2): FSDP2 on 2 gloo ranks follows DDP's loss curve, its
checkpoints hold the optimizer as torch.distributed.checkpoint shards, and a 2-rank checkpoint resumes on 1
rank; activation checkpointing changes memory, not the numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from eupe.step import CLAIM_FILE
from runs import BIN, RESUME_EVERY, env, finish, losses, one_thread, recipe, spawn, stage2_args, stage2_norm  # noqa: F401

ITERS = 2 * RESUME_EVERY
FSDP = ("--set", "distributed.strategy=fsdp")


def _torchrun(*argv: object) -> list[object]:
    return [BIN / "torchrun", "--standalone", "--nproc_per_node", 2, "-m", "eupe.cli", *argv]


def _close(a: Path, b: Path, rtol: float) -> None:
    """Weights within float noise: Adam divides by sqrt(v), so a last-bit gradient difference moves a weight by up
    to a fraction of the learning rate (2e-3) per step: atol 5e-5."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=rtol, atol=5e-5), f"{k}: max |diff| {(ta[k] - tb[k]).abs().max()}"


@pytest.fixture(scope="module")
def two_rank_runs(recipe, stage2_norm, tmp_path_factory):
    """The same stage-2 run on 2 ranks with DDP and with FSDP2 (8 steps, a checkpoint every 4)."""
    root = tmp_path_factory.mktemp("fsdp")
    procs = []
    for name, extra in (("ddp", ()), ("fsdp", FSDP)):
        log = root / f"{name}.log"
        with open(log, "wb") as f:
            procs.append((subprocess.Popen([str(a) for a in _torchrun(*stage2_args(recipe, stage2_norm, root / name, ITERS, *extra))],
                                           stdout=f, stderr=subprocess.STDOUT, env=env(), start_new_session=True), log))
    for proc, log in procs:
        finish(proc, log)
    return root


def test_fsdp_follows_the_ddp_loss_curve(two_rank_runs):
    ddp, fsdp = losses(two_rank_runs / "ddp"), losses(two_rank_runs / "fsdp")
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-4)
    assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-3)
    _close(two_rank_runs / "fsdp" / "encoder.safetensors", two_rank_runs / "ddp" / "encoder.safetensors", rtol=1e-3)
    result = json.loads((two_rank_runs / "fsdp" / "result.json").read_text())
    assert result["metrics"]["world_size"] == 2


def test_fsdp_checkpoints_hold_the_optimizer_as_distributed_checkpoint_shards(two_rank_runs):
    ckpt = two_rank_runs / "fsdp" / "checkpoints" / f"step_{ITERS:08d}"
    shards = sorted(p.name for p in (ckpt / "optim").iterdir())
    assert ".metadata" in shards and sum(s.endswith(".distcp") for s in shards) == 2, shards
    assert torch.load(ckpt / "state.pt", weights_only=True)["optimizer"] is None
    assert (ckpt / "model.safetensors").is_file()  # the whole model, for --init, evaluate and versioning
    assert not list((two_rank_runs / "fsdp" / "checkpoints").glob(".optim-*"))  # staging moved in


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_rank(two_rank_runs, recipe, stage2_norm, tmp_path):
    """The checkpoint of step 4 of the 2-rank FSDP run, resumed by one process (accumulating the 2 micro-batches
    the ranks ran side by side): the same curve from step 4 on, and the same final weights, within tolerance."""
    out = tmp_path / "run"
    step = f"step_{RESUME_EVERY:08d}"
    shutil.copytree(two_rank_runs / "fsdp" / "checkpoints" / step, out / "checkpoints" / step)
    (out / CLAIM_FILE).write_text('{"step": "train-stage2"}')  # as the killed run left its --out
    from eupe.cli import main

    with one_thread():
        assert main([str(a) for a in stage2_args(recipe, stage2_norm, out, ITERS, *FSDP, "--resume")]) == 0
    got, want = losses(out), losses(two_rank_runs / "fsdp")
    assert json.loads((out / "result.json").read_text())["metrics"]["steps_this_run"] == ITERS - RESUME_EVERY
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    _close(out / "encoder.safetensors", two_rank_runs / "fsdp" / "encoder.safetensors", rtol=1e-3)


def test_activation_checkpointing_and_compile_change_how_not_what(recipe, stage2_norm, tmp_path):
    from eupe.cli import main
    from eupe.config import load_config
    from eupe.distill.parallel import blocks, parallelize
    from eupe.distill.runtime import Runtime
    from eupe.models.registry import build_model

    with one_thread():
        for name, extra in (("plain", ()), ("ac", ("--set", "distributed.activation_checkpointing=true"))):
            assert main([str(a) for a in stage2_args(recipe, stage2_norm, tmp_path / name, 4, *extra)]) == 0
    assert losses(tmp_path / "ac")["loss"] == pytest.approx(losses(tmp_path / "plain")["loss"], rel=1e-6)
    cfg = load_config(recipe, ["distributed.compile=true", "distributed.activation_checkpointing=true"])

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = build_model(cfg.student)

    model = parallelize(Holder(), [], cfg, Runtime(torch.device("cpu")))
    assert model.encoder.grad_checkpointing and all(b._compiled_call_impl is not None for b in blocks(model.encoder))


def test_fsdp_into_s3_every_rank_adds_its_shard_and_another_node_resumes(recipe, stage2_norm, s3_bucket, tmp_path,
                                                                       monkeypatch, spawn):
    """--out s3://: each rank trains in its own working folder; every shard reaches the bucket's checkpoint
    before latest.json names it, and a pod with an empty cache resumes from the bucket on one rank."""
    from eupe import storage
    from eupe.cli import main

    out = f"s3://{s3_bucket}/fsdp-run"
    monkeypatch.setenv("EUPE_CACHE", str(tmp_path / "cache-a"))
    log = tmp_path / "fsdp.log"
    finish(spawn(_torchrun(*stage2_args(recipe, stage2_norm, out, ITERS, *FSDP)), log), log)
    names = sorted(u.rsplit("/", 1)[-1] for u in storage.list_uris(f"{out}/checkpoints/step_{ITERS:08d}/optim"))
    assert ".metadata" in names and sum(n.endswith(".distcp") for n in names) == 2, names
    monkeypatch.setenv("EUPE_CACHE", str(tmp_path / "cache-b"))  # another node
    with one_thread():
        assert main([str(a) for a in stage2_args(recipe, stage2_norm, out, ITERS + RESUME_EVERY, *FSDP, "--resume",
                                                 "--allow-config-change", "stage2.iters")]) == 0
    assert storage.read_json(f"{out}/result.json")["metrics"]["steps_this_run"] == RESUME_EVERY
