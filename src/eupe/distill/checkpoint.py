"""Atomic training checkpoints: ``step_XXXXXXXX/{model.safetensors,state.pt}`` plus ``latest.json``.

A directory appears under its final name only once complete, and ``latest.json`` is rewritten after
it, so a run killed at any moment resumes from the last complete checkpoint.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from eupe import storage

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensors_for_disk(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}


OPTIM_DIR = "optim"  # sharded optimizer state (torch.distributed.checkpoint) of an FSDP run


def optim_staging(root: Path, step: int) -> Path:
    """Where every rank of an FSDP run writes its optimizer shard before rank 0 publishes the checkpoint."""
    return root / f".optim-{step:08d}"


KEEP = 2  # complete checkpoints on the schedule a training run keeps


def save(root: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], keep: int = KEEP,
         first: bool = False, regular: Callable[[int], bool] | None = None) -> Path:
    """Write ``step_<step>`` atomically, point ``latest.json`` at it, keep the newest ``keep`` (:func:`prune`;
    ``regular``: which steps are on the checkpoint schedule). ``first``: the first save of a fresh run, which
    replaces every checkpoint an older run left in ``root``. The optimizer shards an FSDP run staged in
    :func:`optim_staging` move in as ``optim/``."""
    final = root / f"step_{step:08d}"
    staged = optim_staging(root, step)
    with storage.atomic_dir(final) as tmp:
        save_file(tensors_for_disk(model_state), str(tmp / MODEL_FILE), metadata={"step": str(step)})
        torch.save({**train_state, "step": step}, tmp / STATE_FILE)
        if staged.is_dir():
            staged.rename(tmp / OPTIM_DIR)
    storage.write_json(str(root / "latest.json"), {"step": step, "path": final.name})
    prune(root, keep, newest=final if first else None, regular=regular)
    return final


def prune(root: Path, keep: int, newest: Path | None = None, regular: Callable[[int], bool] | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints on the schedule (``regular(step)``; default: every one is)
    and the newest of all (or ``newest`` alone). A preemption's checkpoint, off the schedule, is where a resume
    starts, so it stays until a later one exists, and never pushes a scheduled one out: a preempted and resumed
    run ends with the checkpoints an uninterrupted one keeps (meanwhile, one more than ``keep``). Anything else
    named ``step_*`` goes too: the ``.tmp-*`` / ``.old-*`` leftovers of a run killed mid-save would otherwise
    sort among the checkpoints and push real ones out (only rank 0 writes here, so none of them is in use)."""
    if newest is not None:
        kept = {newest}
    else:
        done = _complete(root)
        scheduled = [p for p in done if regular is None or regular(int(p.name.removeprefix("step_")))]
        kept = set(scheduled[-keep:]) | set(done[-1:])
    for path in (set(root.glob("step_*")) | set(root.glob(".optim-*"))) - kept:  # .optim-*: a killed save's shards
        shutil.rmtree(path, ignore_errors=True)


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.name.removeprefix("step_").isdigit() and (p / STATE_FILE).is_file())


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest.json`` names; if a kill mid-save left it dangling, the newest complete one."""
    marker = root / "latest.json"
    if marker.is_file():
        name = str(storage.read_json(str(marker)).get("path", ""))
        path = root / name
        if name.startswith("step_") and "/" not in name and (path / STATE_FILE).is_file():
            return path
    done = _complete(root) if root.is_dir() else []
    return done[-1] if done else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    # weights_only: optimizer/scheduler state, RNG byte tensors and plain Python values only.
    # Python's random state is a tuple of ints, which the safe unpickler accepts.
    return load_file(str(path / MODEL_FILE)), torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
