"""``eupe plan``: will a recipe fit its GPUs? Each stage's step measured, the fitting settings recommended."""

from __future__ import annotations

import logging
import warnings

from eupe.config import Config
from eupe.errors import EupeError
from eupe.plan import report
from eupe.plan.recommend import GIB, Planner, StagePlan, unfit_message
from eupe.plan.step import amp_dtype, fake_world

log = logging.getLogger(__name__)


def precision_note(cfg: Config) -> str:
    if amp_dtype(cfg) is None:
        return "fp32 (precision: fp32)"
    return ("bf16 autocast as on GPUs (CUDA's operator lists; FSDP params bf16, fp32 master weights, gradients "
            "and AdamW moments)")


def run_plan(cfg: Config, config_name: str, gpus: int, gpu_memory: int, nodes: int = 1, headroom: float = 0.1,
             min_micro_batch: int = 8, stages: list[int] | None = None, out: str | None = None) -> list[StagePlan]:
    """Measure and recommend for every stage on ``nodes`` x ``gpus`` GPUs of ``gpu_memory`` bytes; print the table,
    write plan.json and plan.png under ``out``. A stage that fits at no setting is one line (exit 2)."""
    if gpus < 1 or nodes < 1:
        raise EupeError(f"--gpus {gpus} --nodes {nodes}: both must be at least 1")
    if not 0 <= headroom < 1:
        raise EupeError(f"--headroom {headroom}: a fraction of the GPU memory in [0, 1)")
    if min_micro_batch < 1:
        raise EupeError(f"--min-micro-batch {min_micro_batch}: must be at least 1")
    stages = stages or [1, 2, 3]
    world = gpus * nodes
    budget = int(gpu_memory * (1 - headroom))
    meta = {"config": config_name, "gpus": gpus, "nodes": nodes, "world_size": world, "gpu_memory": gpu_memory,
            "headroom": headroom, "budget": budget, "min_micro_batch": min_micro_batch,
            "precision": precision_note(cfg), "batch_sizes": {str(s): cfg.stage(s).batch_size for s in stages},
            "distributed": cfg.distributed.model_dump(mode="json")}
    planner = Planner(cfg, world, budget, min_micro_batch)
    with warnings.catch_warnings(), fake_world(world):
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on the adapters' outputs
        warnings.filterwarnings("ignore", message=".*Module is None.*")
        plans = [planner.table(stage) for stage in stages]
        meta["recommended"] = planner.recommend(plans)
        planner.finish(plans)
    print(report.table(plans, meta), flush=True)
    if meta["recommended"] is None:
        raise EupeError(unfit_message(plans, gpu_memory))
    if out:
        files = report.write(plans, meta, out)
        print(f"plan: {files['json']}, {files['png']}")
    log.info("plan: %d steps measured", sum(len(p.probes) for p in plans))
    return plans


__all__ = ["GIB", "run_plan"]
