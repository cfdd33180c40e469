"""``result.json``: every step ends by writing status, metrics, artifact paths and timings next to its outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save

from eupe import invocation, storage
from eupe.distill.checkpoint import MODEL_FILE, tensors_for_disk

RESULT_FILE = "result.json"
ENCODER_FILE = "encoder.safetensors"  # the deliverable of a training stage


def write_result(out: Path | str, step: str, metrics: dict[str, Any], artifacts: dict[str, Any], status: str = "ok",
                 fingerprint: dict | None = None) -> dict:
    artifacts = {k: str(v) for k, v in artifacts.items() if v is not None}
    result = {"step": step, "status": status, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "metrics": metrics, "artifacts": {k: storage.relative_to(v, out) for k, v in artifacts.items()}}
    if fingerprint is not None:
        result["fingerprint"] = fingerprint
    result["provenance"] = provenance(fingerprint)
    if invocation.CURRENT is not None:  # the command line: what `eupe.invocation.up_to_date` compares
        result["invocation"] = invocation.CURRENT
    storage.write_json(f"{str(out).rstrip('/')}/{RESULT_FILE}", result)  # paths relative to result.json's folder
    return {**result, "artifacts": {k: storage.resolve_from(v, out) for k, v in result["artifacts"].items()}}


def provenance(fingerprint: dict | None) -> dict:
    """Who made this result: the pipeline run (``EUPE_RUN_ID``, set by the step runner), the code version, the
    config's sha256 and the content digest of each dataset input."""
    from eupe.fingerprint import code_digest

    fp = fingerprint or {}
    data = {k: v["digest"] for k, v in fp.get("inputs", {}).items() if k == "data" or k.startswith("data.")}
    return {"run_id": os.environ.get("EUPE_RUN_ID") or None, "pipeline": os.environ.get("EUPE_PIPELINE") or None,
            "code": fp.get("code") or code_digest(), "config_sha256": fp.get("config"), "data": data}


def window_mean(values: list[float], fraction: float = 0.2, cap: int = 100) -> tuple[float, float]:
    """Mean of the first and of the last ``fraction`` of a curve (1 to ``cap`` points each): per-step
    losses are noisy, and in stage 3 they depend on the resolutions each step drew."""
    w = min(cap, max(1, int(len(values) * fraction)))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def write_training_result(run, stage: int, history: dict, metrics: dict, checkpoint_dir: Path | str | None,
                          encoder_state: dict, spec=None, lineage: dict | None = None) -> dict:
    """The deliverables of a training stage, published through its :class:`eupe.step.StepRun`: the encoder
    (adapters dropped) as ``encoder.safetensors`` and as a timm/HF model folder ``model/`` (from ``spec``, the
    encoder's ModelSpec, with ``lineage`` in its config.json), the loss history and its curve; then ``result.json``."""
    from eupe.models.publish import MODEL_DIR, write_model_folder
    from eupe.plots import loss_curve  # matplotlib only when a run finishes

    with run.staging() as tmp:
        storage.write_bytes(str(tmp / ENCODER_FILE), save(tensors_for_disk(encoder_state)))
        if spec is not None:
            write_model_folder(tmp / MODEL_DIR, spec, encoder_state, {"stage": stage, **(lineage or {})})
        storage.write_json(str(tmp / "losses.json"), history)
        loss_curve(history, tmp / "loss_curve.png", title=f"stage {stage}")
    first, last = window_mean(history["loss"])
    per_target = {name: {"first": window_mean(v)[0], "last": window_mean(v)[1]} for name, v in history["per_target"].items()}
    metrics = {"first_loss": first, "last_loss": last, "first_step_loss": history["loss"][0],
               "last_step_loss": history["loss"][-1], "loss_per_target": per_target, **metrics}
    return run.finish(metrics, {
        "checkpoint": checkpoint_dir,
        "checkpoint_model": f"{str(checkpoint_dir).rstrip('/')}/{MODEL_FILE}" if checkpoint_dir else None,
        "encoder": run.path(ENCODER_FILE), "model": run.path(MODEL_DIR) if spec is not None else None,
        "losses": run.path("losses.json"), "loss_curve": run.path("loss_curve.png")})


def read_result(out: Path | str) -> dict:
    return storage.read_result(out)
