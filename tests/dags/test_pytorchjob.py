"""Multi-node training in the cluster mode: the training steps as Kubeflow PyTorchJobs (no cluster).

The DAG built by components.airflow_dag with ``train_nodes`` > 1 and the operator's manifest from a
template like the chart's; the job's life is a fake ``CustomObjectsApi`` (and ``CoreV1Api`` for the failed
master's pod and log) injected as the operator's hook: created, polled to Succeeded or Failed, deleted.
With tests/fixtures/crds/kubeflow.org_pytorchjobs.yaml (the Training Operator's CRD) the manifest is also validated
against its schema.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from components.graph import FINETUNE, RETRAIN

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "tests" / "fixtures" / "crds"
CRD = next((p for p in (CRDS / "kubeflow.org_pytorchjobs.yaml", CRDS / "pytorchjob.yaml") if p.is_file()), None)

TEMPLATE = """
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: eupe-train
  labels: {app.kubernetes.io/managed-by: Helm}
spec:
  nprocPerNode: "8"
  elasticPolicy: {rdzvBackend: c10d, rdzvPort: 23456, minReplicas: 2, maxReplicas: 2, maxRestarts: 3}
  runPolicy: {cleanPodPolicy: Running}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: Never
      template:
        spec:
          securityContext: {runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000, fsGroup: 1000}
          nodeSelector: {nvidia.com/gpu.present: "true"}
          tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
          volumes: [{name: checkpoints, persistentVolumeClaim: {claimName: eupe-checkpoints}}]
          containers:
            - name: pytorch
              image: registry.example/eupe-cuda:2.0
              command: [torchrun]
              args: [-m, components.task]
              envFrom: [{secretRef: {name: eupe-s3}}]
              resources:
                requests: {cpu: "16", memory: 128Gi, nvidia.com/gpu: "8"}
                limits: {cpu: "16", memory: 128Gi, nvidia.com/gpu: "8"}
              volumeMounts: [{name: checkpoints, mountPath: /checkpoints}]
              securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
    Worker:
      replicas: 1
      restartPolicy: Never
      template:
        spec:
          containers:
            - name: pytorch
              image: registry.example/eupe-cuda:2.0
              command: [torchrun]
              args: [-m, components.task]
"""

ROOT_CAUSE = """[rank0]: eupe: error: --data: not found: s3://ml/nope
E1201 torch/distributed/elastic/multiprocessing/api.py failed (exitcode: {code})
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
components.task FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_21:04:39
  host      : eupe-train-stage2-master-0
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 61)
  error_file: <N/A>
============================================================"""


@pytest.fixture(scope="module")
def airflow_here(tmp_path_factory):
    """Airflow imported into this process with a temporary home (as in test_dags)."""
    home = tmp_path_factory.mktemp("airflow_here")
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith(("AIRFLOW_VAR_", "AIRFLOW__"))]:
            mp.delenv(k)
        if "airflow" not in sys.modules:
            mp.setenv("AIRFLOW_HOME", str(home))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        from components import airflow_dag, airflow_pytorchjob, airflow_tasks

        yield SimpleNamespace(**{**vars(airflow_tasks), **vars(airflow_dag), **vars(airflow_pytorchjob)})


def context(dag, task, run_id: str = "scheduled__2026-01-05T00:00:00+00:00", try_number: int = 1, **params) -> dict:
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, map_index=-1, try_number=try_number)
    return {"params": {**dag.params.dump(), **params}, "run_id": run_id, "ti": ti, "dag": dag,
            "triggering_asset_events": {}}


class FakeCluster:
    """The calls the operator makes of CustomObjectsApi and CoreV1Api; a job goes through ``states``
    (one per poll), its master pod ends with ``exit_code`` and ``log``."""

    def __init__(self, states=("Created", "Running", "Succeeded"), exit_code: int | None = None, log: str = ""):
        self.states, self.exit_code, self.log = list(states), exit_code, log
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.deleted: list[str] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs") and namespace == body["metadata"][
            "namespace"]
        job = json.loads(json.dumps(body))  # what the API server stores: plain JSON
        self.jobs[body["metadata"]["name"]] = job
        self.created.append(job)
        return job

    def get_namespaced_custom_object_status(self, group, version, namespace, plural, name):
        from kubernetes.client.exceptions import ApiException

        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        self.jobs[name]["status"] = {"conditions": [{"type": state, "status": "True", "message": f"job {state}"}],
                                     "replicaStatuses": {"Master": {"active": 1}}}
        return self.jobs[name]

    get_namespaced_custom_object = get_namespaced_custom_object_status

    def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector=""):
        wanted = dict(kv.split("=", 1) for kv in label_selector.split(","))
        return {"items": [j for j in self.jobs.values() if wanted.items() <= j["metadata"]["labels"].items()]}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body=None):
        self.deleted.append(name)
        self.jobs.pop(name, None)

    def read_namespaced_pod(self, name, namespace):
        from kubernetes.client import models as k8s

        if not name.endswith("-master-0"):
            raise RuntimeError("not found")
        state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=self.exit_code))
        return k8s.V1Pod(status=k8s.V1PodStatus(container_statuses=[k8s.V1ContainerStatus(
            name="pytorch", image="i", image_id="i", ready=False, restart_count=0, state=state)]))

    def read_namespaced_pod_log(self, name, namespace, container=None, tail_lines=None):
        return self.log


@pytest.fixture
def template(tmp_path) -> Path:
    path = tmp_path / "pytorchjob.yaml"
    path.write_text(TEMPLATE)
    return path


def settings(airflow_here, template: Path, **kw):
    return airflow_here.Settings(mode="cluster", image="registry.example/eupe:1.2",
                                 gpu_image="registry.example/eupe-cuda:1.2", artifact_root="s3://ml/eupe",
                                 namespace="ml", s3_secret="eupe-s3", pytorchjob_template=str(template), **kw)


def job_task(dag, task_id: str, cluster: FakeCluster):
    task = dag.task_dict[task_id]
    task.__dict__["hook"] = SimpleNamespace(custom_object_client=cluster, core_v1_client=cluster)  # no cluster
    task.poll_interval_s = 0
    return task


# --------------------------------------------------------------------------- the DAG


def test_with_train_nodes_the_training_steps_are_pytorchjobs_and_the_rest_pods(airflow_here, template):
    dag = airflow_here.build_dag(RETRAIN, schedule=None, settings=settings(airflow_here, template, train_nodes=2))
    kinds = {t.task_id: (t.operator_class.__name__ if hasattr(t, "operator_class") else type(t).__name__)
             for t in dag.tasks}
    training = {s.name for s in RETRAIN.steps if s.name.startswith("train_")}
    assert training == {"train_stage1", "train_stage2", "train_stage3"}
    assert RETRAIN.step("teachers").resumable  # resumable, but one process: a pod, not a PyTorchJob
    assert {t for t, k in kinds.items() if k == "EupePyTorchJobOperator"} == training
    assert {k for t, k in kinds.items() if t not in training} == {"EupePodOperator"}
    task = dag.task_dict["train_stage2"]
    assert (task.nodes, task.namespace, task.retries) == (2, "ml", RETRAIN.step("train_stage2").retries)
    assert task.retry_exponential_backoff == 2.0 and sorted(task.upstream_task_ids) == sorted(
        RETRAIN.step("train_stage2").needs)

    per_stage = airflow_here.build_dag(FINETUNE, schedule=None,
                                       settings=settings(airflow_here, template, train_nodes_stage3=4))
    assert type(per_stage.task_dict["train_stage2"]).__name__ == "EupePodOperator"  # one node: a pod as before
    assert per_stage.task_dict["train_stage3"].nodes == 4


def test_one_node_or_embedded_mode_changes_nothing(airflow_here, template, monkeypatch):
    for s in (settings(airflow_here, template), airflow_here.Settings(train_nodes=4)):
        dag = airflow_here.build_dag(RETRAIN, schedule=None, settings=s)
        kinds = {t.operator_class.__name__ if hasattr(t, "operator_class") else type(t).__name__ for t in dag.tasks}
        assert kinds == {"EupePodOperator" if s.mode == "cluster" else "EupeStepOperator"}
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_TRAIN_NODES", "3")
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_TRAIN_NODES_STAGE1", "2")
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_MODE", "cluster")
    s = airflow_here.Settings.load()
    assert [s.nodes(RETRAIN.step(n)) for n in ("validate", "train_stage1", "train_stage2", "evaluate")] == [1, 2, 3, 1]


# --------------------------------------------------------------------------- the manifest


def test_the_submitted_job_is_the_template_with_name_labels_workers_and_the_steps_arguments(
        airflow_here, template, tmp_path):
    dag = airflow_here.build_dag(RETRAIN, schedule=None, settings=settings(airflow_here, template, train_nodes=2))
    cluster = FakeCluster()
    task = job_task(dag, "train_stage2", cluster)
    assert task.execute(context(dag, task, run_name="w2")) is None
    (job,) = cluster.created
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    meta = job["metadata"]
    name = meta["name"]
    assert meta["namespace"] == "ml" and len(name) <= 50 and name.endswith("-t1")
    assert re.fullmatch(r"eupe-train-stage2-[0-9a-f]{8}-t1", name)  # DNS-1123; its pods' names too
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/name": "eupe",
                              "app.kubernetes.io/component": "training", "eupe/pipeline": "eupe_retrain",
                              "eupe/run": "w2", "eupe/step": "train_stage2", "eupe/try": "1"}
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8" and spec["runPolicy"] == {"cleanPodPolicy": "Running"}
    # a lost worker restarts the group (torchrun --max-restarts) around a rendezvous on this job's Master
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvPort": 23456, "rdzvHost": f"{name}-master-0",
                                     "minReplicas": 2, "maxReplicas": 2, "maxRestarts": 3}
    master, worker = spec["pytorchReplicaSpecs"]["Master"], spec["pytorchReplicaSpecs"]["Worker"]
    assert (master["replicas"], worker["replicas"]) == (1, 1)
    m = master["template"]["spec"]
    assert m["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and m["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert m["securityContext"]["runAsUser"] == 1000 and m["volumes"][0]["name"] == "checkpoints"
    for replica in (master, worker):
        assert replica["template"]["metadata"]["labels"]["eupe/step"] == "train_stage2"
        (c,) = replica["template"]["spec"]["containers"]
        assert (c["name"], c["image"], c["command"]) == ("pytorch", "registry.example/eupe-cuda:2.0", ["torchrun"])
        assert c["args"][:2] == ["-m", "components.task"]
        assert c["args"][2:] == ["--pipeline", "eupe_retrain", "--run-id", "w2", "--artifact-root", "s3://ml/eupe",
                                 "--params", c["args"][9], "--step", "train_stage2"]
        assert c["envFrom"] == [{"secretRef": {"name": "eupe-s3"}}]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert cluster.deleted == [name]  # succeeded: deleted, as the pod operator deletes a succeeded pod

    # the arguments resolve, where the job runs, to the step's command line, which resumes
    from components.run import PipelineRun

    args = dict(zip(c["args"][2:-2:2], c["args"][3:-2:2]))
    run = PipelineRun.create(RETRAIN, str(tmp_path), args["--run-id"], json.loads(args["--params"]))
    for step, artifacts in (("normalize_stage2", {"stats": "n.safetensors"}), ("train_stage1", {"encoder": "e"})):
        Path(run.out(step)).mkdir(parents=True)
        Path(run.out(step), "result.json").write_text(json.dumps({"artifacts": artifacts}))
    command = run.command(RETRAIN.step(c["args"][-1]))
    assert command[0] == "train" and "--resume" in command and "--norm" in command

    if CRD is not None:  # the chart's fixture: the Training Operator's CRD
        jsonschema = pytest.importorskip("jsonschema")
        crd = yaml.safe_load(CRD.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        jsonschema.validate(job, version["schema"]["openAPIV3Schema"])


def test_fallbacks_a_bare_template_gets_the_steps_resources_workers_and_secret(airflow_here, tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "spec": {
        "pytorchReplicaSpecs": {"Master": {"template": {"spec": {"containers": [{"name": "pytorch"}]}}}}}}))
    dag = airflow_here.build_dag(RETRAIN, schedule=None, settings=settings(airflow_here, bare, train_nodes=3))
    task = dag.task_dict["train_stage3"]
    job = task.manifest(context(dag, task, try_number=2))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["nprocPerNode"] == "8" and job["metadata"]["name"].endswith("-t2")
    assert job["metadata"]["labels"]["eupe/run"] == "scheduled__2026-01-05T00-00-00-00-00"  # a label value
    assert job["metadata"]["annotations"]["eupe/airflow-run-id"] == "scheduled__2026-01-05T00:00:00+00:00"
    for replica in replicas.values():
        (c,) = replica["template"]["spec"]["containers"]
        assert c["image"] == "registry.example/eupe-cuda:1.2" and c["command"] == ["torchrun"]
        assert c["args"][:2] == ["-m", "components.task"] and c["args"][-2:] == ["--step", "train_stage3"]
        gpus = {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8"}
        assert c["resources"] == {"requests": gpus, "limits": gpus}
        assert c["envFrom"] == [{"secretRef": {"name": "eupe-s3"}}]

    not_a_job = tmp_path / "pod.yaml"
    not_a_job.write_text("kind: Pod\n")
    task.template = str(not_a_job)
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="not a PyTorchJob"):
        task.manifest(context(dag, task))


# --------------------------------------------------------------------------- how it ends


def test_a_failed_job_fails_at_once_on_bad_input_or_a_gate_and_is_retried_otherwise(airflow_here, template):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

    dag = airflow_here.build_dag(RETRAIN, schedule=None, settings=settings(airflow_here, template, train_nodes=2))
    # torchrun exits 1 whatever its worker returned: the root cause in the log is the step's code
    for code, log, message in ((1, ROOT_CAUSE.format(code=2), r"bad input \(exit 2, not retried\): .*s3://ml/nope"),
                               (3, "eupe: error: gate", "gate failed"),
                               (1, ROOT_CAUSE.format(code=1), None), (137, "", None), (None, "", None)):
        cluster = FakeCluster(states=("Created", "Running", "Failed"), exit_code=code, log=log)
        task = job_task(dag, "train_stage2", cluster)
        with pytest.raises(AirflowException, match=message or "failed .*retried, resuming") as e:
            task.execute(context(dag, task, run_name="f"))
        assert isinstance(e.value, AirflowFailException) == (message is not None), (code, log)
        assert cluster.deleted == [] and len(cluster.created) == 1  # a failed job is kept, with its logs

    # a retry is a new job; one of an earlier try still running (its worker lost) is deleted first
    cluster = FakeCluster(states=("Running",))
    task = job_task(dag, "train_stage2", cluster)
    task.timeout_s = 1e-9
    with pytest.raises(AirflowException, match="still Running .*retried"):
        task.execute(context(dag, task, run_name="r"))
    first = cluster.created[0]["metadata"]["name"]
    assert cluster.deleted == [first]  # timed out: deleted
    cluster.jobs[first] = cluster.created[0]  # as if still there
    cluster.states, cluster.deleted = ["Succeeded"], []
    task.timeout_s = None
    task.execute(context(dag, task, run_name="r", try_number=2))
    second = cluster.created[1]["metadata"]["name"]
    assert second == first[:-1] + "2" and cluster.deleted == [first, second]

    # killed while it runs: the job is deleted
    cluster = FakeCluster(states=("Running",))
    task = job_task(dag, "train_stage2", cluster)
    polled = cluster.get_namespaced_custom_object_status

    def killed(*args):
        task.on_kill()  # as Airflow does, from another thread, while the job runs
        return polled(*args)

    cluster.get_namespaced_custom_object_status = killed
    with pytest.raises(AirflowException, match="is gone"):
        task.execute(context(dag, task, run_name="k"))
    assert cluster.deleted == [cluster.created[0]["metadata"]["name"]]

    cluster = FakeCluster()
    task = job_task(dag, "train_stage1", cluster)
    with pytest.raises(AirflowSkipException, match="proxy"):  # decided before anything is submitted
        task.execute(context(dag, task, proxy="s3://ml/proxy.safetensors"))
    assert cluster.created == []
