"""The Airflow tasks of the EUPE DAGs, shared by both modes, and the embedded mode's operator.

Every task runs the entry point ``python -m components.task`` (:mod:`components.task`), which resolves the
step's ``eupe`` command line where it runs and exits with ``eupe``'s code; :func:`raise_for_exit` turns
that code into what Airflow does: 1 (a crash, a kill) is retried, 2 (bad input) and 3 (a failed gate) fail
at once, :data:`~components.task.SKIPPED` skips. :class:`Settings` are Airflow Variables.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, AssetAlias, BaseOperator, Variable
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from components import images
from components.airflow_params import FORM_TO_PIPELINE
from components.graph import Pipeline, Step
from components.run import PipelineRun
from components.task import SKIPPED
from eupe.errors import EXIT_PREEMPTED

PROJECT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """The switch and what it needs, from Airflow Variables ``eupe_<field>`` (or ``AIRFLOW_VAR_EUPE_<FIELD>``)."""

    mode: str = "embedded"  # or "cluster"
    artifact_root: str = "artifacts"  # runs/ and models/ live under it; cluster: an s3:// prefix
    workdir: str = str(PROJECT)  # embedded: the folder relative paths (configs/, data) are read from
    python: str = ""  # embedded: the interpreter of the project's environment (default: Airflow's own)
    image: str = images.image()  # cluster: the project's image (containers/; env EUPE_IMAGE)
    gpu_image: str = images.gpu_image()  # cluster: image of the GPU steps (env EUPE_GPU_IMAGE; default: image)
    namespace: str = "eupe"
    s3_secret: str = "eupe-s3"  # a Kubernetes Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL...
    service_account: str = ""
    retry_delay_s: float = 60.0  # first retry of an exit 1; doubled at each further try, at most an hour
    retrain_schedule: str = "0 3 * * 1"  # cron, UTC: Mondays 03:00
    dataset_uri: str = ""  # the Asset retraining also runs on (default: the pipeline's dataset_uri)
    train_nodes: int = 1  # cluster: nodes of a training step; > 1 runs it as a PyTorchJob (torchrun on each)
    train_nodes_stage1: int = 0  # cluster: the nodes of one stage (0: train_nodes)
    train_nodes_stage2: int = 0
    train_nodes_stage3: int = 0
    pytorchjob_template: str = "/opt/eupe/pytorchjob/pytorchjob.yaml"  # cluster: the chart's PyTorchJob (ConfigMap)
    params: str = ""  # JSON {pipeline: {parameter: default}}: the chart's defaults of the DAGs' form fields
    pushgateway: str = ""  # cluster: EUPE_PUSHGATEWAY of the step pods (default: Airflow's own EUPE_PUSHGATEWAY)

    def param_defaults(self, pipeline: str) -> dict[str, Any]:
        """This deployment's defaults of ``pipeline``'s parameters (model names, budgets, device classes)."""
        if not self.params:
            return {}
        try:
            value = json.loads(self.params).get(pipeline, {})
        except (ValueError, AttributeError):
            raise ValueError(f"Airflow Variable eupe_params: not a JSON object of pipelines: {self.params!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"Airflow Variable eupe_params: {pipeline}: not an object of parameters: {value!r}")
        return value

    @classmethod
    def load(cls) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = Variable.get(f"eupe_{f.name}", default=None)
            if raw not in (None, ""):
                values[f.name] = type(f.default)(raw)
        s = cls(**values)
        if s.mode not in ("embedded", "cluster"):
            raise ValueError(f"Airflow Variable eupe_mode: {s.mode!r} is neither 'embedded' nor 'cluster'")
        return s

    def nodes(self, step: Step) -> int:
        """Nodes a step runs on in cluster mode: a distillation stage (``train_*``) its stage's
        ``train_nodes_<stage>`` or else ``train_nodes``; any other step one (the teacher zoo and the ablation are
        resumable, yet single-process). Embedded mode: always one."""
        if self.mode != "cluster" or not step.name.startswith("train_"):
            return 1
        return max(1, getattr(self, f"train_nodes_{step.name.removeprefix('train_')}", 0) or self.train_nodes)


# --------------------------------------------------------------------------- exit codes


def error_line(lines: list[str]) -> str:
    """The one line ``eupe`` ends a bad input or a failed gate with (else the last line written)."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    return next((ln for ln in reversed(lines) if ln.startswith(("eupe: error:", "eupe: preempted:"))),
                lines[-1] if lines else "")


def raise_for_exit(label: str, code: int, lines: list[str]) -> None:
    """0: done; :data:`SKIPPED`: skip; 2 and 3: fail now (never retried); 143 (SIGTERM, checkpoint saved) and
    anything else: retried."""
    if code == 0:
        return
    if code == SKIPPED:
        raise AirflowSkipException(f"{label}: not needed in this run")
    line = error_line(lines)
    if code == 2:
        raise AirflowFailException(f"{label}: bad input (exit 2, not retried): {line}")
    if code == 3:
        raise AirflowFailException(f"{label}: gate failed (exit 3, not retried): {line}")
    if code == EXIT_PREEMPTED:
        raise AirflowException(f"{label}: preempted (exit {code}, retried: it resumes from the checkpoint it saved): {line}")
    raise AirflowException(f"{label}: exit {code}, a crash or transient failure (retried): {line}")


# --------------------------------------------------------------------------- the tasks


class EupeTask:
    """What both modes share: which step of which pipeline, the entry point's arguments for a run, the skips,
    and the dataset's asset event after ``version_data``."""

    pipeline: Pipeline
    step_name: str | None
    action: str  # "run" a step, "plan" its fan-out, "summary" of the run
    artifact_root: str
    item: dict | None
    dataset: tuple[Asset, AssetAlias] | None  # version_data: (the Asset the DAG is scheduled on, the alias it emits)

    def _setup(self, pipeline: Pipeline, step: str | None, action: str, artifact_root: str, item, dataset) -> None:
        self.pipeline, self.step_name, self.action, self.artifact_root = pipeline, step, action, artifact_root
        self.item, self.dataset = item, dataset

    @property
    def label(self) -> str:
        name = self.step_name or self.action
        return f"{self.pipeline.name}.{name}" + (f"[{self.item['name']}]" if self.item else "")

    @property
    def returns_json(self) -> bool:
        """A planner returns its elements; the versioning step its metrics (for the dataset's asset event)."""
        return self.action == "plan" or self.dataset is not None

    def pipeline_run(self, context) -> PipelineRun:
        params = dict(context["params"])
        run_id = params.get("run_name") or context["run_id"]
        return PipelineRun.create(self.pipeline, self.artifact_root, str(run_id), pipeline_params(self.pipeline, params))

    def entry_args(self, context, xcom_file: str | None = None) -> list[str]:
        run = self.pipeline_run(context)
        args = ["--pipeline", self.pipeline.name, "--run-id", run.run_id, "--artifact-root", self.artifact_root,
                "--params", json.dumps({k: v for k, v in run.params.items() if v is not None}, sort_keys=True)]
        if self.step_name:
            args += ["--step", self.step_name]
        if self.item is not None:
            args += ["--item", json.dumps(self.item, sort_keys=True)]
        if self.action == "plan":
            args.append("--plan")
        elif self.action == "summary":
            args.append("--summary")
        return args + (["--xcom-file", xcom_file] if xcom_file else [])

    def skip_unneeded(self, context) -> None:
        """Before anything runs: a step the parameters make unnecessary, or a run started only by an asset
        event this DAG emitted itself (its own ``version_data``: nothing new to train on)."""
        if self.action == "run" and self.step_name:
            step = self.pipeline.step(self.step_name)
            if self.pipeline_run(context).skipped(step):
                raise AirflowSkipException(f"{step.name}: not needed ({step.skip_if} is set)")
        events = context.get("triggering_asset_events") or {}
        sources = {e.source_dag_id for evs in events.values() for e in evs}
        if sources and sources <= {self.pipeline.name} and str(context["run_id"]).startswith("asset_triggered"):
            raise AirflowSkipException("started by this DAG's own dataset version: nothing new")

    def finished(self, context, result):
        """What the task returns (XCom); after ``version_data``, the dataset's asset event when its DVC hash is
        one the asset's last event did not have (versioning unchanged data starts no other run)."""
        if self.dataset is None or self.action != "run":
            return result
        scheduled, alias = self.dataset
        asset = dataset_asset(str(self.pipeline_run(context).params["dataset_uri"]))
        digest = (result or {}).get("hash")
        last = None
        if asset.uri == scheduled.uri:
            try:
                previous = context["inlet_events"][scheduled]
                last = previous[-1].extra.get("hash") if len(previous) else None
            except Exception as e:  # noqa: BLE001 - no event history reachable: record the version anyway
                self.log.warning("dataset events of %s not readable (%s): emitting one", asset.uri, e)
        if digest == last:
            self.log.info("dataset %s: version %s, as at its last asset event", asset.uri, digest)
        else:
            context["outlet_events"][alias].add(asset, extra={"hash": digest, "run_id": context["run_id"]})
            self.log.info("dataset %s: new version %s (asset event)", asset.uri, digest)
        return result


def pipeline_params(pipeline: Pipeline, dag_params: dict) -> dict:
    """The pipeline's parameters from the DAG's (a form field such as ``device_class`` mapped onto its own)."""
    out = {k: v for k, v in dag_params.items() if k in pipeline.params}
    for form, name in FORM_TO_PIPELINE.items():
        if form in dag_params and name in pipeline.params and dag_params[form] not in (None, ""):
            out[name] = dag_params[form]
    return out


class EupeStepOperator(EupeTask, BaseOperator):
    """Embedded mode: the entry point as a subprocess of this environment, streamed into the task log."""

    ui_color = "#e8f0fe"

    def __init__(self, *, pipeline: Pipeline, step: str | None = None, action: str = "run",
                 artifact_root: str, workdir: str, python: str = "", item: dict | None = None,
                 dataset: tuple[Asset, AssetAlias] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._setup(pipeline, step, action, artifact_root, item, dataset)
        self.workdir, self.python = workdir, python or sys.executable
        self._proc: subprocess.Popen | None = None

    def execute(self, context):
        self.skip_unneeded(context)
        xcom = Path(tempfile.mkstemp(prefix="eupe-task-", suffix=".json")[1]) if self.returns_json else None
        argv = [self.python, "-m", "components.task", *self.entry_args(context, str(xcom) if xcom else None)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",  # the environment's bin/ first: `eupe`, `dvc`
               "PATH": os.pathsep.join([str(Path(self.python).parent), os.environ.get("PATH", "")])}
        self.log.info("%s: %s", self.label, " ".join(argv[1:]))
        tail: collections.deque[str] = collections.deque(maxlen=50)
        try:
            with subprocess.Popen(argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1) as self._proc:
                for line in self._proc.stdout:
                    line = line.rstrip("\n")
                    self.log.info("%s", line)
                    tail.append(line)
            code, self._proc = self._proc.returncode, None
            raise_for_exit(self.label, code, list(tail))
            return self.finished(context, json.loads(xcom.read_text()) if xcom else None)
        finally:
            if xcom is not None:
                xcom.unlink(missing_ok=True)

    def on_kill(self) -> None:
        """SIGTERM to the step: training saves a checkpoint before it exits, the retry resumes from it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


def dataset_asset(uri: str) -> Asset:
    """The Asset of a training dataset: ``s3://...`` as it is, a local folder as a ``file://`` URI."""
    if "://" not in uri:
        path = Path(uri) if Path(uri).is_absolute() else PROJECT / uri
        uri = path.resolve().as_uri()
    return Asset(uri=uri, name=f"eupe_dataset:{uri}", group="eupe-datasets")
