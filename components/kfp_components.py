"""The KFP lightweight components of the EUPE pipelines: a few generic functions, and what they run.

KFP embeds the *source* of a component function in the pipeline (``inspect``), so each function below is
self-contained: it imports this module inside the container (the project's image, or this environment under
``kfp.local``) and calls a helper, which runs the same entry point as every Airflow task,
``components.task.main([...])``; the artifacts stay under ``<artifact root>/runs/<pipeline>/<run id>/<step>/``.
:mod:`components.kfp_pipeline` decorates them with ``dsl.component(base_image=...)`` when it builds a pipeline
(so ``EUPE_IMAGE`` is read then) and gives each task its step's name, resources, retries and caching.

Every step component has the same inputs (the run, the step, the parameters as one dict, a fan-out element as
JSON, up to :data:`SLOTS` upstream artifacts for lineage) and two outputs: ``out`` (the step's ``result.json``,
its folder in the metadata; a Dataset, a Model or an Artifact by kind) and ``metrics`` (the numbers of that
``result.json``). It returns ``passed``: False only when a gate step exits 3 (``gate=True``); any other
non-zero exit fails the task with that exit code; exit 99 (the step is not needed) is a no-op that succeeds.

No ``from __future__ import annotations`` here: KFP reads the annotations as types.
"""

import json
import tempfile
from pathlib import Path
from typing import List, NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

SLOTS = 6  # upstream artifacts a step component can take (the in-degree of the widest step of the graph)
GATE_FAILED = 3


# --------------------------------------------------------------------------- what the components run


def _entry(pipeline: str, run_id: str, artifact_root: str, params: dict, step: str = "") -> list:
    args = ["--pipeline", pipeline, "--run-id", run_id, "--artifact-root", artifact_root,
            "--params", json.dumps({k: v for k, v in params.items() if v is not None}, sort_keys=True)]
    return args + (["--step", step] if step else [])


def run_step(pipeline: str, step: str, run_id: str, artifact_root: str, params: dict, item: str, gate: bool,
             out, metrics) -> tuple:
    """``python -m components.task`` for one step (one element of a fan-out); its result.json into ``out``."""
    from components.graph import PIPELINES
    from components.run import PipelineRun
    from components.task import SKIPPED, main

    code = main(_entry(pipeline, run_id, artifact_root, params, step) + (["--item", item] if item else []))
    element = json.loads(item) if item else None
    run = PipelineRun.create(PIPELINES[pipeline], artifact_root, run_id, params)
    out.metadata.update({"step": step, "folder": run.out(step, element), "item": element["name"] if element else ""})
    if code == SKIPPED:
        out.metadata.update(skipped=True, passed=True)
        Path(out.path).write_text(json.dumps({"step": step, "status": "skipped"}) + "\n")
        return (True,)
    if code != 0 and not (gate and code == GATE_FAILED):
        print(f"{pipeline}.{step}: exit {code} ({'bad input' if code == 2 else 'see the log above'})", flush=True)
        raise SystemExit(code)
    result = run.result(step, element)
    Path(out.path).write_text(json.dumps(result, indent=2) + "\n")
    out.metadata.update(status=result.get("status"), passed=code == 0)
    for key, value in (result.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and value == value:  # numbers (and booleans as 0/1), no NaN
            metrics.log_metric(key, float(value))
    return (code == 0,)


def plan_items(pipeline: str, step: str, run_id: str, artifact_root: str, params: dict) -> list:
    """The elements ``step`` is mapped over (``--plan``), each as a JSON string (KFP would turn ints into floats)."""
    from components.task import main

    with tempfile.TemporaryDirectory() as tmp:
        xcom = str(Path(tmp) / "plan.json")
        code = main(_entry(pipeline, run_id, artifact_root, params, step) + ["--plan", "--xcom-file", xcom])
        if code != 0:
            raise SystemExit(code)
        return [json.dumps(e, sort_keys=True) for e in json.loads(Path(xcom).read_text())]


def collect(step: str, items: list, out, metrics) -> tuple:
    """The elements of a fanned-out step as one artifact; passed when every element passed."""
    rows = [{"item": a.metadata.get("item"), "folder": a.metadata.get("folder"), "passed": a.metadata.get("passed"),
             "status": a.metadata.get("status")} for a in items]
    Path(out.path).write_text(json.dumps({"step": step, "items": rows}, indent=2) + "\n")
    passed = all(r["passed"] is not False for r in rows)
    folder = rows[0]["folder"].rsplit("/", 1)[0] if rows and rows[0]["folder"] else ""  # <run>/<step>
    out.metadata.update(step=step, folder=folder, items=len(rows), passed=passed)
    metrics.log_metric("items", float(len(rows)))
    metrics.log_metric("failed", float(sum(r["passed"] is False for r in rows)))
    return (passed,)


def summarize(pipeline: str, run_id: str, artifact_root: str, params: dict, report) -> None:
    """``--summary``: summary.json in the run folder, and its table as the run's Markdown report."""
    from components.graph import PIPELINES
    from components.run import PipelineRun, join, read_json
    from components.summary import format_table
    from components.task import main

    code = main(_entry(pipeline, run_id, artifact_root, params) + ["--summary"])
    if code != 0:
        raise SystemExit(code)
    root = PipelineRun.create(PIPELINES[pipeline], artifact_root, run_id, params).root
    Path(report.path).write_text(f"# {pipeline} / {run_id}\n\n```\n{format_table(read_json(join(root, 'summary.json')))}\n```\n")


# --------------------------------------------------------------------------- the component functions


def dataset_step(pipeline: str, step: str, run_id: str, artifact_root: str, params: dict,
                 out: Output[Dataset], metrics: Output[Metrics], item: str = "", gate: bool = False,
                 in_1: Input[Artifact] = None, in_2: Input[Artifact] = None, in_3: Input[Artifact] = None,
                 in_4: Input[Artifact] = None, in_5: Input[Artifact] = None, in_6: Input[Artifact] = None,
                 ) -> NamedTuple("Outputs", [("passed", bool)]):
    """A step whose output is data (validated manifest, dataset version, normalization statistics)."""
    from components.kfp_components import run_step

    return run_step(pipeline, step, run_id, artifact_root, params, item, gate, out, metrics)


def model_step(pipeline: str, step: str, run_id: str, artifact_root: str, params: dict,
               out: Output[Model], metrics: Output[Metrics], item: str = "", gate: bool = False,
               in_1: Input[Artifact] = None, in_2: Input[Artifact] = None, in_3: Input[Artifact] = None,
               in_4: Input[Artifact] = None, in_5: Input[Artifact] = None, in_6: Input[Artifact] = None,
               ) -> NamedTuple("Outputs", [("passed", bool)]):
    """A step whose output is a model (a trained encoder, an exported .pte, the promoted version)."""
    from components.kfp_components import run_step

    return run_step(pipeline, step, run_id, artifact_root, params, item, gate, out, metrics)


def report_step(pipeline: str, step: str, run_id: str, artifact_root: str, params: dict,
                out: Output[Artifact], metrics: Output[Metrics], item: str = "", gate: bool = False,
                in_1: Input[Artifact] = None, in_2: Input[Artifact] = None, in_3: Input[Artifact] = None,
                in_4: Input[Artifact] = None, in_5: Input[Artifact] = None, in_6: Input[Artifact] = None,
                ) -> NamedTuple("Outputs", [("passed", bool)]):
    """A step whose output is a report (an evaluation, a latency measurement): the gates."""
    from components.kfp_components import run_step

    return run_step(pipeline, step, run_id, artifact_root, params, item, gate, out, metrics)


def plan(pipeline: str, step: str, run_id: str, artifact_root: str, params: dict,
         in_1: Input[Artifact] = None, in_2: Input[Artifact] = None, in_3: Input[Artifact] = None,
         in_4: Input[Artifact] = None, in_5: Input[Artifact] = None, in_6: Input[Artifact] = None) -> List[str]:
    """The planner of a fanned-out step: the elements its ``dsl.ParallelFor`` runs over."""
    from components.kfp_components import plan_items

    return plan_items(pipeline, step, run_id, artifact_root, params)


def fan_in(step: str, items: Input[List[Artifact]], out: Output[Artifact], metrics: Output[Metrics],
           ) -> NamedTuple("Outputs", [("passed", bool)]):
    """Every element of a fanned-out step (``dsl.Collected``) as one artifact for the steps after it."""
    from components.kfp_components import collect

    return collect(step, items, out, metrics)


def resolve_run_id(run_name: str, job_id: str) -> str:
    """The run's folder under runs/<pipeline>/: ``run_name`` when given (it continues that run), else the KFP run."""
    return run_name or job_id


def gate_failed(gate: str, step: str, report: Input[Artifact]):
    """The run stops here, failed, when a gate said no: promote never ran (the step's result.json says why)."""
    print(f"eupe: error: {gate} gate failed at {step}: nothing is promoted (see {report.metadata.get('folder')})",
          flush=True)
    raise SystemExit(3)


def summary(pipeline: str, run_id: str, artifact_root: str, params: dict, report: Output[Markdown],
            last: Input[Artifact] = None):
    """The run's summary table (summary.json in the run folder), after promote."""
    from components.kfp_components import summarize

    summarize(pipeline, run_id, artifact_root, params, report)
