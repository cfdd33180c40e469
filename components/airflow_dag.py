"""Airflow DAGs built from the step graph: one task per step of a :class:`~components.graph.Pipeline`.

    dag = build_dag(RETRAIN, schedule=retrain_schedule(RETRAIN))      # dags/eupe_retrain.py
    dag = build_dag(FINETUNE, params=finetune_form(FINETUNE))         # dags/eupe_domain_finetune.py

Two modes, one switch (Airflow Variables, also read from ``AIRFLOW_VAR_EUPE_<NAME>``; see
:class:`~components.airflow_tasks.Settings`): ``embedded`` (default), each task a subprocess of the
project's environment (:class:`~components.airflow_tasks.EupeStepOperator`); ``cluster``, each task a
KubernetesPodOperator running the project's image with the step's resources
(:class:`~components.airflow_pod.EupePodOperator`). Both run ``python -m components.task``. In cluster
mode a training step whose stage asks for more than one node (``eupe_train_nodes``, ``eupe_train_nodes_stage<N>``)
is a Kubeflow PyTorchJob instead, ``torchrun -m components.task`` on each node
(:class:`~components.airflow_pytorchjob.EupePyTorchJobOperator`).

Retries come from the graph (exit 1 only, exponential back-off); a step the parameters make unnecessary is
skipped and its downstream tasks run on (trigger rule ``none_failed_min_one_success``: past a skip, never
past a failure). A fanned-out step is a planner task (``plan_<step>``, the elements from
:mod:`components.plan`) and ``.expand(item=...)``; a ``summary`` task ends the run. Imports Airflow's
authoring API and the light step graph only (no torch, no Kubernetes client in embedded mode): the DAG
files parse in well under 2 s.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import DAG, AssetAlias, Param, TriggerRule

from components.airflow_params import dag_params, with_defaults
from components.airflow_tasks import EupeStepOperator, Settings, dataset_asset
from components.graph import Pipeline, Step

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def retrain_schedule(pipeline: Pipeline, settings: Settings | None = None):
    """Weekly (the ``eupe_retrain_schedule`` Variable, cron in UTC) or when the dataset gets a new version."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    s = settings or Settings.load()
    asset = dataset_asset(s.dataset_uri or str(pipeline.params["dataset_uri"]))
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(s.retrain_schedule, timezone="UTC"), assets=[asset])


def build_dag(pipeline: Pipeline, schedule=None, params: dict[str, Param] | None = None,
              settings: Settings | None = None, **dag_kwargs) -> DAG:
    """The DAG of ``pipeline``: its steps with the graph's edges, planners before fanned-out steps, a summary
    after promote. ``params``: the DAG's Params (default :func:`components.airflow_params.dag_params`: every
    pipeline parameter as a string)."""
    s = settings or Settings.load()
    params = with_defaults(dag_params(pipeline) if params is None else params, s.param_defaults(pipeline.name),
                           pipeline.name)  # the deployment's defaults (the chart's eupe_params)
    cluster = s.mode == "cluster"
    if cluster:
        from components import airflow_pod  # the Kubernetes client: only in cluster mode

        operator, mode_kwargs = airflow_pod.EupePodOperator, lambda step: airflow_pod.pod_kwargs(step, s)
        if any(s.nodes(step) > 1 for step in pipeline.steps):
            from components import airflow_pytorchjob  # multi-node training: a PyTorchJob per training step
    else:
        operator, mode_kwargs = EupeStepOperator, lambda step: {"workdir": s.workdir, "python": s.python}

    def multinode(step: Step | None, action: str) -> bool:
        return step is not None and action == "run" and s.nodes(step) > 1  # cluster mode, a training step

    dataset = None
    if "version_data" in [st.name for st in pipeline.steps]:
        asset = dataset_asset(s.dataset_uri or str(pipeline.params["dataset_uri"]))
        dataset = (asset, AssetAlias(name=f"{pipeline.name}__dataset_versions", group="eupe-datasets"))

    def kwargs(task_id: str, step: Step | None, action: str, upstream: list) -> dict:
        kw: dict[str, Any] = dict(
            task_id=task_id, pipeline=pipeline, step=step.name if step else None, action=action,
            artifact_root=s.artifact_root, retries=step.retries if step and action == "run" else 1,
            retry_delay=timedelta(seconds=s.retry_delay_s), retry_exponential_backoff=2.0,  # True would be x1
            max_retry_delay=timedelta(hours=1),
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS if upstream else TriggerRule.ALL_SUCCESS)
        if multinode(step, action):
            kw.update(airflow_pytorchjob.job_kwargs(step, s))
        else:
            kw.update(mode_kwargs(step if action == "run" else None))  # a planner's or the summary's pod: small
        if step and step.name == "version_data" and action == "run" and dataset is not None:
            kw.update(dataset=dataset, inlets=[dataset[0]], outlets=[dataset[1]])
        if step and step.name == "promote":
            kw["max_active_tis_per_dag"] = 1  # two promotes of one name could read the same production
        return kw

    with DAG(dag_id=pipeline.name, description=pipeline.description.split(": ")[0], doc_md=pipeline.description,
             schedule=schedule, start_date=START, catchup=False, max_active_runs=1,
             params=params, tags=["eupe", s.mode], **dag_kwargs) as dag:
        tasks: dict[str, Any] = {}
        for step in pipeline.steps:
            upstream = [tasks[n] for n in step.needs]
            if step.expand:
                planner = operator(**kwargs(f"plan_{step.name}", step, "plan", upstream))
                upstream >> planner
                task = operator.partial(**kwargs(step.name, step, "run", [planner])).expand(item=planner.output)
            else:
                cls = airflow_pytorchjob.EupePyTorchJobOperator if multinode(step, "run") else operator
                task = cls(**kwargs(step.name, step, "run", upstream))
            upstream >> task
            tasks[step.name] = task
        tasks[pipeline.steps[-1].name] >> operator(**{**kwargs("summary", None, "summary", []), "retries": 0})
    return dag
