"""The cluster mode's multi-node training: a Kubeflow PyTorchJob from the chart's template, submitted and awaited.

A training step (``Step.resumable``) whose stage asks for more than one node (:meth:`Settings.nodes
<components.airflow_tasks.Settings.nodes>`: the ``eupe_train_nodes`` Variable, or ``eupe_train_nodes_stage<N>``)
runs as one PyTorchJob of the Kubeflow Training Operator instead of one pod: a Master and ``nodes - 1``
Workers, each ``torchrun -m components.task <the step's entry arguments>`` in the project's image. The job
is the chart's template (``eupe_pytorchjob_template``, the ConfigMap mounted at
``/opt/eupe/pytorchjob/pytorchjob.yaml``: image, ``nprocPerNode``, GPUs, node selectors, tolerations, the
checkpoint volume, the S3 Secret); this operator gives it a name, labels and the replica count, appends the
run's arguments, submits it and polls its conditions.

How it ends: Succeeded, the task succeeds; Failed, the exit code of the step decides, as for a pod. torchrun
exits 1 whatever its worker returned, so the code is read from its "Root Cause" summary in the log of the
failed replica (else the container's own code): 2 (bad input) and 3 (a failed gate) fail the task at once,
anything else is retried by Airflow with back-off; the retry submits a new job (its name carries the try
number) and training resumes from the last checkpoint (the step's command always has ``--resume``). A job
of an earlier try that is still running (a lost Airflow worker) is deleted first, so two jobs never write
one run's checkpoints. Killing the task deletes the job (SIGTERM: the trainer saves a checkpoint).

Imported only in cluster mode; the Kubernetes client is imported when a task runs.
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from components.airflow_tasks import EupeTask, Settings, error_line, raise_for_exit
from components.graph import Pipeline, Resources, Step
from components.task import SKIPPED

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the container the Training Operator requires in every replica
ENTRY_ARGS = ("-m", "components.task")  # after torchrun
ROOT_CAUSE = "Root Cause (first observed failure)"  # torchrun's summary of a failed worker
EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
LABEL = re.compile(r"[^A-Za-z0-9_.-]+")
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")  # torchrun --tee / --local-ranks-filter


def label_value(value: str) -> str:
    """A Kubernetes label value: at most 63 of ``[A-Za-z0-9_.-]``, alphanumeric at both ends."""
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", LABEL.sub("-", value)[:63])


def job_name(dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    """A DNS-1123 name, unique per DAG run, task and try, short enough (< 50) for the replicas' pods and
    services (``<name>-worker-<i>``) to stay DNS labels."""
    digest = hashlib.sha1(f"{dag_id}\0{run_id}\0{task_id}\0{map_index}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9]+", "-", task_id.lower()).strip("-")[:28].strip("-")
    return f"eupe-{stem}-{digest}-t{try_number}"


def job_state(job: dict) -> tuple[str, str]:
    """(Succeeded | Failed | the latest true condition | Pending, its message) of a PyTorchJob."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if str(c.get("status")) == "True"]
    for terminal in ("Failed", "Succeeded"):
        for c in conditions:
            if c.get("type") == terminal:
                return terminal, c.get("message") or c.get("reason") or ""
    if conditions:
        return conditions[-1].get("type", "Pending"), conditions[-1].get("message") or ""
    return "Pending", ""


def torchrun_exit_code(lines: list[str]) -> int | None:
    """The exit code of the worker process torchrun names as the root cause of its failure (torchrun itself
    exits 1 whatever that code was)."""
    for i, line in enumerate(lines):
        if ROOT_CAUSE in line:
            for after in lines[i + 1:]:
                m = EXIT.match(after)
                if m:
                    return int(m.group(1))
    return None


def pod_exit_code(pod, container: str = CONTAINER) -> int | None:
    """The container's terminated state (or its last one, after a restart in place)."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for s in statuses:
        if s.name == container:
            for state in (s.state, s.last_state):
                if state is not None and state.terminated is not None:
                    return state.terminated.exit_code
    return None


def replica_container(replica: dict) -> dict:
    spec = replica.setdefault("template", {}).setdefault("spec", {})
    containers = spec.setdefault("containers", [{"name": CONTAINER}])
    return next((c for c in containers if c.get("name") == CONTAINER), containers[0])


class EupePyTorchJobOperator(EupeTask, BaseOperator):
    """Cluster mode, a training step on ``nodes`` nodes: the chart's PyTorchJob running ``torchrun -m
    components.task`` with the run's arguments on each, submitted and polled until it ends."""

    ui_color = "#fde8d8"

    def __init__(self, *, pipeline: Pipeline, step: str, action: str = "run", artifact_root: str, nodes: int,
                 template: str, namespace: str, s3_secret: str = "", image: str = "", service_account: str = "",
                 kubernetes_conn_id: str = "kubernetes_default", poll_interval_s: float = 30.0,
                 timeout_s: float | None = None, stale_wait_s: float = 300.0, delete_on_success: bool = True,
                 item: dict | None = None, dataset=None, **kwargs):
        super().__init__(**{"do_xcom_push": False, **kwargs})
        self._setup(pipeline, step, action, artifact_root, item, dataset)
        self.nodes, self.template, self.namespace = int(nodes), template, namespace
        self.s3_secret, self.image, self.service_account = s3_secret, image, service_account
        self.kubernetes_conn_id, self.poll_interval_s, self.timeout_s = kubernetes_conn_id, poll_interval_s, timeout_s
        self.stale_wait_s, self.delete_on_success = stale_wait_s, delete_on_success
        self._job: str | None = None

    # ----------------------------------------------------------------------- the cluster

    @cached_property
    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id)

    @property
    def jobs(self):
        """A ``kubernetes.client.CustomObjectsApi``."""
        return self.hook.custom_object_client

    @property
    def pods(self):
        """A ``kubernetes.client.CoreV1Api``."""
        return self.hook.core_v1_client

    # ----------------------------------------------------------------------- the manifest

    @property
    def step(self) -> Step:
        return self.pipeline.step(self.step_name)

    def labels(self, context) -> dict[str, str]:
        return {"app.kubernetes.io/name": "eupe", "app.kubernetes.io/component": "training",
                "eupe/pipeline": label_value(self.pipeline.name),
                "eupe/run": label_value(self.pipeline_run(context).run_id), "eupe/step": label_value(self.step.name)}

    def load_template(self) -> dict:
        import yaml

        path = Path(self.template)
        try:
            job = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise AirflowFailException(f"{self.label}: the PyTorchJob template (Airflow Variable "
                                       f"eupe_pytorchjob_template) {path}: {e}") from e
        if not isinstance(job, dict) or job.get("kind") != KIND or "Master" not in (
                (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}):
            raise AirflowFailException(f"{self.label}: {path} is not a {KIND} with a Master replica")
        return job

    def manifest(self, context) -> dict:
        """The template with this try's name and labels, ``nodes - 1`` Workers and the step's arguments."""
        job = copy.deepcopy(self.load_template())
        ti = context["ti"]
        labels = self.labels(context)
        meta = job["metadata"] = job.get("metadata") or {}
        meta.pop("generateName", None)
        meta.update(name=job_name(ti.dag_id, str(context["run_id"]), ti.task_id, getattr(ti, "map_index", -1),
                                  int(ti.try_number)), namespace=self.namespace)
        meta["labels"] = {**(meta.get("labels") or {}), **labels, "eupe/try": str(ti.try_number)}
        meta["annotations"] = {**(meta.get("annotations") or {}), "eupe/run-id": self.pipeline_run(context).run_id,
                               "eupe/airflow-run-id": str(context["run_id"])}
        spec = job["spec"]
        if isinstance(spec.get("elasticPolicy"), dict):  # torchrun's c10d rendezvous on this job's Master
            spec["elasticPolicy"].update(rdzvHost=f"{meta['name']}-master-0", minReplicas=self.nodes,
                                         maxReplicas=self.nodes)
        replicas = spec["pytorchReplicaSpecs"]
        replicas["Master"]["replicas"] = 1
        if self.nodes > 1:
            replicas.setdefault("Worker", copy.deepcopy(replicas["Master"]))["replicas"] = self.nodes - 1
        else:
            replicas.pop("Worker", None)
        r = self.step.resources
        spec.setdefault("nprocPerNode", str(r.gpus) if r.gpus else "auto")
        args = self.entry_args(context)
        for replica in replicas.values():
            template = replica.setdefault("template", {})
            pod_meta = template["metadata"] = template.get("metadata") or {}
            pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels}
            pod = template.setdefault("spec", {})
            if self.service_account and not pod.get("serviceAccountName"):
                pod["serviceAccountName"] = self.service_account
            c = replica_container(replica)
            c.setdefault("name", CONTAINER)
            if not c.get("image") and self.image:
                c["image"] = self.image
            c.setdefault("command", ["torchrun"])
            c["args"] = [*(c.get("args") or ENTRY_ARGS), *args]
            fill_resources(c, r)
            if self.s3_secret and not c.get("envFrom"):
                c["envFrom"] = [{"secretRef": {"name": self.s3_secret}}]
        return job

    # ----------------------------------------------------------------------- running it

    def execute(self, context):
        self.skip_unneeded(context)  # before anything is submitted
        body = self.manifest(context)
        name, ns = body["metadata"]["name"], self.namespace
        self.delete_stale(context, keep=name)
        self.log.info("%s: PyTorchJob %s/%s, %d node(s) x %s process(es): torchrun %s", self.label, ns, name,
                      self.nodes, body["spec"].get("nprocPerNode"),
                      " ".join(replica_container(body["spec"]["pytorchReplicaSpecs"]["Master"])["args"]))
        self.jobs.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        self._job = name
        self.wait(name)
        self._job = None
        if self.delete_on_success:
            self.delete(name)
        return self.finished(context, None)

    def wait(self, name: str) -> None:
        """Poll until the job Succeeded (return) or Failed (raise, as its exit code says)."""
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        last, errors = None, 0
        while True:
            try:
                job = self.jobs.get_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name)
                errors = 0
            except ApiException as e:
                if e.status == 404:
                    self._job = None
                    raise AirflowException(f"{self.label}: PyTorchJob {self.namespace}/{name} is gone (deleted?): "
                                           "retried") from e
                errors += 1
                if errors > 5:
                    raise
                self.log.warning("PyTorchJob %s: status not readable (%s), polling on", name, e)
                job = None
            if job is not None:
                state, message = job_state(job)
                if state != last:
                    replicas = (job.get("status") or {}).get("replicaStatuses") or {}
                    self.log.info("PyTorchJob %s: %s %s %s", name, state, message, replicas or "")
                    last = state
                if state == "Succeeded":
                    self.log_tail(name, 20)
                    return
                if state == "Failed":
                    self._job = None  # kept, with its pods' logs, for a look; the retry submits a new one
                    self.failed(name, message)
            if deadline is not None and time.monotonic() > deadline:
                self.delete(name)
                self._job = None
                raise AirflowException(f"{self.label}: PyTorchJob {name} still {last} after {self.timeout_s:.0f} s: "
                                       "deleted, retried")
            time.sleep(self.poll_interval_s)

    def failed(self, name: str, message: str) -> None:
        """Exit 2 or 3 of the step (in any replica) fails the task at once; anything else is retried."""
        code, lines, where = self.exit_code(name)
        for line in lines[-40:]:
            self.log.info("%s | %s", where, line)
        if code in (2, 3, SKIPPED):
            raise_for_exit(self.label, code, lines)
        raise AirflowException(f"{self.label}: PyTorchJob {self.namespace}/{name} failed ({message or 'no message'}; "
                               f"exit {code}): retried, resuming from the last checkpoint: {error_line(lines)}")

    def exit_code(self, name: str) -> tuple[int | None, list[str], str]:
        """The step's exit code in the failed job (a 2 or 3 of any replica first, else the master's), with the
        log lines of that replica."""
        found: list[tuple[int | None, list[str], str]] = []
        for pod in [f"{name}-master-0", *(f"{name}-worker-{i}" for i in range(self.nodes - 1))]:
            try:
                code = pod_exit_code(self.pods.read_namespaced_pod(pod, self.namespace))
            except Exception as e:  # noqa: BLE001 - a pod already gone: the next one
                self.log.info("pod %s not readable: %s", pod, e)
                continue
            lines = self.pod_log(pod, 200)
            root = torchrun_exit_code(lines)
            found.append((root if root is not None else code, lines, pod))
            if found[-1][0] in (2, 3):
                return found[-1]
        return next((f for f in found if f[0] not in (None, 0)), found[0] if found else (None, [], name))

    def pod_log(self, pod: str, lines: int) -> list[str]:
        try:
            text = self.pods.read_namespaced_pod_log(pod, self.namespace, container=CONTAINER, tail_lines=lines)
        except Exception as e:  # noqa: BLE001 - logs are a courtesy
            self.log.info("log of %s not readable: %s", pod, e)
            return []
        return [RANK_PREFIX.sub("", line) for line in (text or "").splitlines()]

    def log_tail(self, name: str, lines: int) -> None:
        for line in self.pod_log(f"{name}-master-0", lines):
            self.log.info("master | %s", line)

    def delete(self, name: str) -> None:
        from kubernetes.client import V1DeleteOptions

        try:
            self.jobs.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                      body=V1DeleteOptions(propagation_policy="Foreground"))
            self.log.info("PyTorchJob %s/%s deleted", self.namespace, name)
        except Exception as e:  # noqa: BLE001 - already gone, or no right to: say so
            self.log.warning("PyTorchJob %s/%s not deleted: %s", self.namespace, name, e)

    def delete_stale(self, context, keep: str) -> None:
        """An unfinished job of an earlier try of this step in this run (its Airflow worker lost) is deleted
        and waited for: one run's checkpoints have one writer."""
        from kubernetes.client.exceptions import ApiException

        selector = ",".join(f"{k}={v}" for k, v in self.labels(context).items() if k.startswith("eupe/"))
        try:
            listed = self.jobs.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                             label_selector=selector)
        except ApiException as e:  # no right to list: nothing to clean up that we could see
            self.log.warning("PyTorchJobs of earlier tries not listed (%s): submitting anyway", e.reason)
            return
        stale = [j["metadata"]["name"] for j in listed.get("items", [])
                 if j["metadata"]["name"] != keep and job_state(j)[0] not in ("Succeeded", "Failed")]
        for name in stale:
            self.log.warning("PyTorchJob %s of an earlier try still runs: deleting it", name)
            self.delete(name)
        deadline = time.monotonic() + self.stale_wait_s
        for name in stale:
            while time.monotonic() < deadline:
                try:
                    self.jobs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
                except ApiException as e:
                    if e.status == 404:
                        break
                time.sleep(min(self.poll_interval_s, 5.0))

    def on_kill(self) -> None:
        """The task killed (or timed out): the job is deleted; its trainers save a checkpoint on SIGTERM."""
        if self._job is not None:
            self.delete(self._job)
            self._job = None


def fill_resources(container: dict, r: Resources) -> None:
    """The step's resources (requests = limits) where the template gives none; its GPUs where it gives none."""
    from components.airflow_pod import resources

    res = container.setdefault("resources", {})
    if not res.get("requests") and not res.get("limits"):
        res["requests"], res["limits"] = resources(r), resources(r)
    elif r.gpus and "nvidia.com/gpu" not in (res.get("limits") or {}):
        for part in ("requests", "limits"):
            res.setdefault(part, {})["nvidia.com/gpu"] = str(r.gpus)


def job_kwargs(step: Step, s: Settings) -> dict[str, Any]:
    """What the PyTorchJob of ``step`` is built from (the DAG's side; the chart's template has the rest)."""
    return dict(nodes=s.nodes(step), template=s.pytorchjob_template, namespace=s.namespace, s3_secret=s.s3_secret,
                image=s.gpu_image or s.image, service_account=s.service_account)
