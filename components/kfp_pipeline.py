"""Kubeflow Pipelines v2 built from the step graph: ``eupe_retrain`` and ``eupe_domain_finetune``.

    python -m components.kfp_pipeline --out build     # build/eupe_retrain.yaml, build/eupe_domain_finetune.yaml
    pipeline = build_pipeline(RETRAIN)                # a dsl pipeline: compile it, or run it under kfp.local

The same steps, edges and parameters as the Airflow DAGs (:mod:`components.airflow_dag`): the parameters are the
DAG's (its trigger form for the fine-tune; a form field such as ``device_class`` reaches the pipeline parameter it
sets), ``run_name`` included: a run writes under ``<artifact root>/runs/<pipeline>/<run_name or the KFP run
id>/``, and a run given an earlier run's name continues it. Each step is a lightweight component of
:mod:`components.kfp_components` in the project's image (:mod:`components.images`: ``EUPE_IMAGE``,
``EUPE_GPU_IMAGE``, read when the pipeline is built) running ``components.task``, the entry point of every
Airflow task, with the step's requests = limits (GPUs as ``nvidia.com/gpu``), its retries (exponential back-off
from 60 s, x2, at most an hour) and caching for the deterministic steps (off for training, which resumes from
its checkpoints, for latency, a measurement, and for promote, which writes the registry). The artifact root is
set when compiling (``EUPE_ARTIFACT_ROOT``, default ``artifacts``; an ``s3://`` prefix on a cluster).

Choices, where KFP differs from Airflow:

* **Lineage.** Every step outputs ``out`` (its ``result.json``; the folder under the artifact root in the
  metadata), a Dataset (data steps), Model (training, export, promote) or Artifact (the gates' reports), and
  ``metrics`` (a Metrics artifact: the numbers of that result.json, e.g. the eval metrics). A step takes the
  ``out`` of every step it needs as an input artifact, so the UI draws the graph's edges as lineage; the step
  itself still resolves its command line from the upstream result.json files, exactly as under Airflow.
* **Fan-out.** A fanned-out step is a planner (``plan-<step>``: ``components.task --plan``), a ``dsl.ParallelFor``
  over its elements, and a fan-in (``<step>-all``, ``dsl.Collected``) that the later steps read.
* **Gates.** A gate step (evaluate: the quality gate; latency: the latency gate, over all its elements) does not
  fail on exit 3: it outputs ``passed`` = False, and every later step runs inside ``dsl.If(passed == True)``;
  its ``dsl.Else`` is a ``<gate>-gate-failed`` task that exits 3, so a run that promoted nothing is a failed
  run, failed at a task named after the gate (as in Airflow, where the gate step fails). Exit 3 of any other
  step, like exit 1 or 2, fails its task (KFP retries any failure: a bad input is retried too, and fails
  again at once, before any long work).
* **Skips.** A step the parameters make unnecessary (stage 1 with a reused ``proxy``; stage 2 of a stage-3-only
  fine-tune) runs and exits 99 at once; its component succeeds as a no-op (``skipped`` in the artifact's
  metadata), and the later steps go on. A ``dsl.If`` cannot do it: KFP forbids depending on a task inside one.

No hand-written YAML: the compiler writes it.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

from kfp import compiler, dsl

from components import images
from components import kfp_components as kc
from components.graph import PIPELINES, Pipeline, Resources, Step

GATES = {"evaluate": "quality", "latency": "latency"}  # gate step -> gate; exit 3 means "did not pass"
UNCACHED = ("latency", "promote")  # besides the resumable (training) steps
CONTROL = Resources(cpu="1", memory="2Gi")  # planners, fan-ins, the run id, the summary: as Airflow's control pods
RETRY_DELAY_S = 60  # as Airflow's eupe_retry_delay_s default


def artifact_root() -> str:
    return os.environ.get("EUPE_ARTIFACT_ROOT") or "artifacts"


def parameters(pipeline: Pipeline) -> dict[str, str]:
    """The Airflow DAG's parameters of ``pipeline`` and their defaults ("" for none), in its order."""
    from components.airflow_params import dag_params, finetune_form
    from components.graph import FINETUNE

    form = finetune_form(pipeline) if pipeline.name == FINETUNE.name else dag_params(pipeline)  # as dags/ does
    return {name: "" if p.value is None else str(p.value) for name, p in form.items()}


def pipeline_params(pipeline: Pipeline, values: dict) -> dict:
    """The pipeline's parameters from the DAG's (a form field such as ``device_class`` mapped onto its own)."""
    from components.airflow_params import FORM_TO_PIPELINE

    out = {}
    for name, value in values.items():
        target = name if name in pipeline.params else FORM_TO_PIPELINE.get(name)
        if target in pipeline.params:
            out[target] = value
    return out


def step_kind(step: Step):
    """The component of a step, by what it outputs: a gate's report, a model, or data."""
    if step.name in GATES:
        return kc.report_step
    if "encoder" in step.outputs or any(f.endswith(".pte") or f.startswith("models/") for f in step.outputs.values()):
        return kc.model_step
    return kc.dataset_step if any("{param:dataset_uri}" in a for a in step.argv) else kc.report_step


def component(func, name: str, gpus: int = 0):
    """``func`` as a component in the project's image, named after its step (not after the generic function)."""
    comp = dsl.component(func, base_image=images.for_step(gpus), install_kfp_package=False)
    comp.component_spec.name = comp.name = name.replace("_", "-")
    return comp


def configure(task, r: Resources, label: str, retries: int = 0, cache: bool = True):
    task.set_display_name(label)
    task.set_cpu_request(r.cpu).set_cpu_limit(r.cpu).set_memory_request(r.memory).set_memory_limit(r.memory)
    if r.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(r.gpus)
    if retries:
        task.set_retry(retries, backoff_duration=f"{RETRY_DELAY_S}s", backoff_factor=2, backoff_max_duration="3600s")
    task.set_caching_options(cache)
    return task


class Builder:
    """Adds the tasks of one pipeline's steps, in graph order, inside the pipeline function."""

    def __init__(self, pipeline: Pipeline, root: str, run_id, params: dict):
        self.pipeline, self.run = pipeline, dict(pipeline=pipeline.name, run_id=run_id, artifact_root=root,
                                                 params=params)
        self.done: dict = {}  # step name -> the artifact the later steps read (its out, or its fan-in's)

    def slots(self, step: Step) -> dict:
        upstream = [self.done[name] for name in step.needs]
        if len(upstream) > kc.SLOTS:
            raise ValueError(f"{self.pipeline.name}.{step.name} reads {len(upstream)} steps; "
                             f"components.kfp_components has {kc.SLOTS} input slots")
        return {f"in_{i}": a for i, a in enumerate(upstream, 1)}

    def step_task(self, step: Step, item=None):
        gpus = step.resources.gpus
        task = component(step_kind(step), step.name, gpus)(
            **self.run, step=step.name, item="" if item is None else item, gate=step.name in GATES,
            **self.slots(step))
        cache = not (step.resumable or step.name in UNCACHED)
        return configure(task, step.resources, step.name, step.retries, cache)

    def add(self, steps: list[Step]) -> None:
        """``steps`` in order; after a gate, the rest inside ``dsl.If(passed)``, its ``dsl.Else`` a failed gate."""
        for i, step in enumerate(steps):
            if step.expand:
                planner = configure(component(kc.plan, f"plan_{step.name}")(**self.run, step=step.name,
                                                                           **self.slots(step)),
                                    CONTROL, f"plan_{step.name}", retries=1, cache=False)
                with dsl.ParallelFor(planner.output, name=f"each-{step.name}".replace("_", "-")) as item:
                    task = self.step_task(step, item)
                out = configure(component(kc.fan_in, f"{step.name}_all")(
                    step=step.name, items=dsl.Collected(task.outputs["out"])), CONTROL, f"{step.name} (all)")
            else:
                out = self.step_task(step)
            self.done[step.name] = out.outputs["out"]
            if step.name in GATES:
                gate = GATES[step.name]
                with dsl.If(out.outputs["passed"] == True, name=f"{gate}-gate-passed"):  # noqa: E712 - a DSL condition
                    self.add(steps[i + 1:])
                with dsl.Else(name=f"{gate}-gate-failed"):
                    configure(component(kc.gate_failed, f"{gate}_gate_failed")(
                        gate=gate, step=step.name, report=self.done[step.name]), CONTROL, f"{gate} gate failed",
                        cache=False)
                return
        last = self.done[self.pipeline.steps[-1].name]
        configure(component(kc.summary, "summary")(**self.run, last=last), CONTROL, "summary", cache=False)


def build_pipeline(pipeline: Pipeline, root: str | None = None):
    """The KFP pipeline of ``pipeline``: one string parameter per Airflow DAG parameter, with its default."""
    form = parameters(pipeline)
    names = list(form)
    root = root or artifact_root()

    def body(*values):
        args = dict(zip(names, values))
        run_id = configure(component(kc.resolve_run_id, "run_id")(
            run_name=args["run_name"], job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), CONTROL, "run_id", cache=False)
        params = pipeline_params(pipeline, {k: v for k, v in args.items() if k != "run_name"})
        Builder(pipeline, root, run_id.output, params).add(list(pipeline.steps))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    body.__signature__ = inspect.Signature([inspect.Parameter(n, kind, default=d, annotation=str)
                                            for n, d in form.items()])
    body.__annotations__ = dict.fromkeys(names, str)
    body.__name__ = body.__qualname__ = pipeline.name
    return dsl.pipeline(name=pipeline.name.replace("_", "-"), description=pipeline.description)(body)


def compile_all(out: str, root: str | None = None) -> list[Path]:
    paths = []
    for pipeline in PIPELINES.values():
        path = Path(out) / f"{pipeline.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(build_pipeline(pipeline, root), str(path))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m components.kfp_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build", help="folder of the compiled pipelines (<pipeline>.yaml)")
    p.add_argument("--artifact-root", default=None, help="runs/ and models/ (default: $EUPE_ARTIFACT_ROOT or artifacts)")
    args = p.parse_args(argv)
    for path in compile_all(args.out, args.artifact_root):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
