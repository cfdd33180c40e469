"""``result.json``: every step ends by writing status, metrics, artifact paths and timings next to its outputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from safetensors.torch import save

from eupe import storage
from eupe.distill.checkpoint import tensors_for_disk

RESULT_FILE = "result.json"


def write_result(out: Path | str, step: str, metrics: dict[str, Any], artifacts: dict[str, Any], status: str = "ok") -> dict:
    result = {"step": step, "status": status, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "metrics": metrics, "artifacts": {k: str(v) for k, v in artifacts.items() if v is not None}}
    storage.write_json(f"{str(out).rstrip('/')}/{RESULT_FILE}", result)
    return result


def clear_result(out: Path | str) -> None:
    """A step that starts over removes its earlier ``result.json`` first: a stale "ok" must not outlive a crash."""
    path = Path(str(out)) / RESULT_FILE
    if not storage.is_s3(str(out)) and path.exists():
        path.unlink()


def window_mean(values: list[float], fraction: float = 0.2, cap: int = 100) -> tuple[float, float]:
    """Mean of the first and of the last ``fraction`` of a curve (1 to ``cap`` points each): per-step
    losses are noisy, and in stage 3 they depend on the resolutions each step drew."""
    w = min(cap, max(1, int(len(values) * fraction)))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def write_training_result(out: Path, stage: int, history: dict, metrics: dict, checkpoint_dir: Path | None,
                          encoder_state: dict) -> dict:
    from eupe.plots import loss_curve  # matplotlib only when a run finishes

    out.mkdir(parents=True, exist_ok=True)
    encoder = out / "encoder.safetensors"  # the deliverable: adapters dropped
    storage.write_bytes(str(encoder), save(tensors_for_disk(encoder_state)))  # atomic, as every artifact
    storage.write_json(str(out / "losses.json"), history)
    curve = loss_curve(history, out / "loss_curve.png", title=f"stage {stage}")
    first, last = window_mean(history["loss"])
    per_target = {name: {"first": window_mean(v)[0], "last": window_mean(v)[1]} for name, v in history["per_target"].items()}
    metrics = {"first_loss": first, "last_loss": last, "first_step_loss": history["loss"][0],
               "last_step_loss": history["loss"][-1], "loss_per_target": per_target, **metrics}
    return write_result(out, f"train-stage{stage}", metrics, {
        "checkpoint": checkpoint_dir, "encoder": encoder, "losses": out / "losses.json", "loss_curve": curve})


def read_result(out: Path | str) -> dict:
    return storage.read_json(f"{str(out).rstrip('/')}/{RESULT_FILE}")
