"""Fan-out planners: the elements a step is mapped over, computed when the run reaches it.

``export`` runs once per (resolution, dtype) of the recipe's ``export`` section (and once per dtype for the
multi-resolution ``.pte``); ``latency`` once per exported ``.pte`` and device class; ``version_checkpoints``
once for the trained teacher zoo and once per trained stage. Airflow maps its tasks over these lists (dynamic
task mapping), the local runner loops over them.
"""

from __future__ import annotations

from collections.abc import Callable

from components.run import PipelineRun


def _config(run: PipelineRun):
    from eupe.config import load_config  # pydantic + YAML, no torch

    return load_config(run.param("config"), run.pipeline.overrides(run.params))


def export_variants(run: PipelineRun) -> list[dict]:
    """One export per resolution x dtype, and with several resolutions (and ``export.multi_resolution``) one
    per dtype of the ``.pte`` with a method per size (``eupe export --only multires``: no ``--resolution``)."""
    ex = _config(run).export
    dtypes = ["fp32"] + (["int8"] if ex.int8 else [])
    rows = [{"name": f"student_{r}px_{d}", "resolution": r, "dtype": d, "only": ""} for r in ex.resolutions for d in dtypes]
    if ex.multi_resolution and len(ex.resolutions) > 1:
        rows += [{"name": f"student_multires_{d}", "resolution": "", "dtype": d, "only": "multires"} for d in dtypes]
    return rows


def device_classes(run: PipelineRun) -> list[str]:
    listed = str(run.params.get("device_classes") or "")
    return [c.strip() for c in listed.split(",") if c.strip()] or [_config(run).latency.device_class]


def latency_runs(run: PipelineRun) -> list[dict]:
    rows = []
    for v in export_variants(run):
        pte = _pte(run, v)
        for device_class in device_classes(run):
            rows.append({"name": f"{v['name']}_{device_class}", "pte": pte, "device_class": device_class,
                         "model": v["name"]})
    return rows


def _pte(run: PipelineRun, variant: dict) -> str:
    """The ``.pte`` the export of ``variant`` wrote (its result.json artifact of the same name)."""
    return run.result("export", variant)["artifacts"][variant["name"]]


def trained_checkpoints(run: PipelineRun) -> list[dict]:
    """The teacher zoo this run trained (its whole folder: the teachers' weights, their heads and numbers), then
    the last checkpoint of every training stage this run trained (a reused proxy's stage 1 did not)."""
    rows = []
    for step in run.pipeline.steps:
        if run.skipped(step):
            continue
        if step.name == "teachers" and run.result(step.name).get("metrics", {}).get("trained"):
            rows.append({"name": step.name, "checkpoint": run.out(step.name)})
        elif step.name.startswith("train_"):
            rows.append({"name": step.name, "checkpoint": run.output(step.name, "checkpoint")})
    return rows


def ablation_seeds(run: PipelineRun) -> list[dict]:
    """One ablation run per seed: the ``seeds`` parameter (comma-separated), else the recipe's ``ablation.seeds``."""
    listed = [s.strip() for s in str(run.params.get("seeds") or "").split(",") if s.strip()]
    bad = [s for s in listed if not s.lstrip("-").isdigit()]
    if bad:
        from eupe.errors import EupeError

        raise EupeError(f"parameter seeds {run.params.get('seeds')!r}: expected integers separated by commas")
    seeds = [int(s) for s in listed] or _config(run).ablation.seeds
    return [{"name": f"seed{s}", "seed": s} for s in dict.fromkeys(seeds)]


PLANNERS: dict[str, Callable[[PipelineRun], list[dict]]] = {
    "ablation_seeds": ablation_seeds,
    "export_variants": export_variants,
    "latency_runs": latency_runs,
    "trained_checkpoints": trained_checkpoints,
}


def items(run: PipelineRun, planner: str | None) -> list[dict | None]:
    return PLANNERS[planner](run) if planner else [None]
