"""The Airflow DAGs of dags/, built by components.airflow_dag from the step graph.

Real Airflow throughout: the DAG files parsed by a DagBag (both modes); `airflow dags test` on a SQLite
database in a temporary AIRFLOW_HOME: the fine-tune form refusing bad values before any task runs, a bad
input failing its task at once, eupe_retrain end to end on the tiny recipe (a training step killed once
after its first checkpoint: retried, resumed) and a domain fine-tune from its outputs; the operators'
exit-code mapping and the cluster mode's pod specs built by the KubernetesPodOperator itself (no cluster).

Retries under `airflow dags test`: its loop (airflow.sdk DAG.test) schedules a task that is up for retry
again once its retry delay has passed, so a retry happens there as under a scheduler; the end-to-end test
sees the killed training step's second try (try_number 2) resume from its checkpoint.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from types import SimpleNamespace

import pytest

from components.graph import FINETUNE, PIPELINES, RETRAIN

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
BIN = Path(sys.executable).parent
FLAKY = Path(__file__).with_name("flaky_python.py")
DATE = "2026-01-05T00:00:00+00:00"


def airflow_env(home: Path, **variables) -> dict[str, str]:
    """What `make demo` sets, with a temporary AIRFLOW_HOME; ``variables`` become AIRFLOW_VAR_EUPE_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_VAR_", "AIRFLOW__"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               AIRFLOW_VAR_EUPE_WORKDIR=str(ROOT))
    env.update({f"AIRFLOW_VAR_EUPE_{k.upper()}": str(v) for k, v in variables.items()})
    return env


def dags_test(home: Path, dag_id: str, conf: dict, timeout: float, **variables) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "airflow"), "dags", "test", dag_id, DATE, "-c", json.dumps(conf)],
                          env=airflow_env(home, **variables), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def task_instances(home: Path, dag_id: str) -> dict[tuple[str, int], tuple[str, int]]:
    """(task_id, map_index) -> (state, try_number) of the DAG's last run, read from the SQLite database."""
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = ?",
                          (dag_id,)).fetchall()
    return {(t, m): (s, n) for t, m, s, n in rows}


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory) -> Path:
    """A migrated SQLite metadata database in a temporary AIRFLOW_HOME (about 8 s)."""
    home = tmp_path_factory.mktemp("airflow_home")
    proc = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=airflow_env(home), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return home


@pytest.fixture(scope="module")
def airflow_here(tmp_path_factory):
    """Airflow imported into this process, its home a temporary folder (never ~/airflow): the names of
    components.airflow_tasks and components.airflow_dag."""
    home = tmp_path_factory.mktemp("airflow_here")
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith(("AIRFLOW_VAR_", "AIRFLOW__"))]:
            mp.delenv(k)
        if "airflow" not in sys.modules:  # its configuration is read once, at import
            mp.setenv("AIRFLOW_HOME", str(home))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
        from components import airflow_dag, airflow_tasks

        yield SimpleNamespace(**{**vars(airflow_tasks), **vars(airflow_dag)})


def context(dag, run_id: str = "manual__t", task=None, **params) -> dict:
    """The parts of a task's context the EUPE operators read (and the pod operator's labels)."""
    values = {**dag.params.dump(), **params}
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id if task else "t", map_index=-1, try_number=1)
    return {"params": values, "run_id": run_id, "ti": ti, "dag": dag, "triggering_asset_events": {}}


# --------------------------------------------------------------------------- parsing


PARSE = r"""
import json, os, sys, time
from airflow.dag_processing.dagbag import DagBag
out = {}
for mode in ("embedded", "cluster"):
    os.environ["AIRFLOW_VAR_EUPE_MODE"] = mode
    t0 = time.perf_counter()
    bag = DagBag(sys.argv[1])
    out[mode] = {"wall_s": time.perf_counter() - t0, "errors": {k: str(v) for k, v in bag.import_errors.items()},
                 "files_s": {os.path.basename(s.file): s.duration.total_seconds() for s in bag.dagbag_stats},
                 "upstream": {d.dag_id: {t.task_id: sorted(t.upstream_task_ids) for t in d.tasks}
                              for d in bag.dags.values()},
                 "types": {d.dag_id: sorted({type(t).__name__ if not hasattr(t, "operator_class") else
                                             t.operator_class.__name__ for t in d.tasks}) for d in bag.dags.values()},
                 "heavy": sorted(m for m in ("torch", "timm", "torchvision", "kubernetes") if m in sys.modules)}
print("RESULT " + json.dumps(out))
"""


def test_both_dags_parse_fast_without_errors_and_have_the_graphs_edges(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PARSE, str(DAGS)], env=airflow_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for mode, r in result.items():
        print(f"{mode}: DagBag filled in {r['wall_s']:.2f} s; per file {r['files_s']}")
        assert r["errors"] == {} and sorted(r["upstream"]) == ["eupe_ablation", "eupe_domain_finetune", "eupe_retrain"]
        for name, upstream in r["upstream"].items():
            pipeline = PIPELINES[name]
            expected = {"summary": [pipeline.steps[-1].name]}
            for step in pipeline.steps:
                if step.expand:
                    expected[f"plan_{step.name}"] = sorted(step.needs)
                    expected[step.name] = sorted({*step.needs, f"plan_{step.name}"})
                else:
                    expected[step.name] = sorted(step.needs)
            assert upstream == expected, name
    embedded, cluster = result["embedded"], result["cluster"]
    assert sum(embedded["files_s"].values()) < 2.0 and embedded["heavy"] == []  # no torch, timm or kubernetes
    assert cluster["heavy"] == ["kubernetes"]  # the pod operator's client, in cluster mode only
    assert embedded["types"]["eupe_retrain"] == ["EupeStepOperator"]
    assert cluster["types"]["eupe_retrain"] == ["EupePodOperator"]


# --------------------------------------------------------------------------- the fine-tune form


@pytest.mark.parametrize("conf", [{"lr": -1}, {"steps": 0}, {"student": "vit_huge"}], ids=["lr", "steps", "student"])
def test_the_finetune_form_refuses_a_bad_value_before_any_task_runs(airflow_home, conf):
    proc = dags_test(airflow_home, "eupe_domain_finetune", {**conf, "run_name": "refused"}, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[DAG TEST] starting task" not in output and "components.task" not in output
    (field, value), = conf.items()
    assert "ParamValidationError" in output and str(value) in output, output[-3000:]
    assert not (ROOT / "artifacts" / "runs" / "eupe_domain_finetune" / "refused").exists()


def test_the_form_is_typed_described_and_maps_onto_the_pipeline(airflow_here):
    from airflow.sdk import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    from components.airflow_params import STUDENTS, device_classes, finetune_form
    from eupe.models.registry import STUDENTS as REGISTRY

    assert list(STUDENTS) == list(REGISTRY)
    form = finetune_form(FINETUNE)
    assert all(p.description for p in form.values())
    # Airflow's form requires every field whose type refuses null: the optional ones must admit it
    from components.airflow_params import dag_params

    for name in ("base_checkpoint", "proxy", "baseline", "run_name"):
        assert "null" in form[name].schema["type"], name
    retrain = dag_params(RETRAIN)
    for name in ("proxy", "baseline", "device_classes", "latency_budget_ms", "run_name"):
        assert "null" in retrain[name].schema["type"], name
    assert form["student"].schema["enum"] == list(REGISTRY) and form["stages"].schema["enum"] == ["3", "2+3"]
    assert form["device_class"].schema["enum"] == device_classes() and "ci-cpu" in device_classes()
    good = {"dataset_uri": "s3://bucket/domain/", "steps": 5, "lr": 1e-4, "latency_budget_ms": 30.5,
            "stages": "2+3", "student": "vit_s", "device_class": "iphone-15-pro-cpu"}

    def filled(values: dict) -> dict:
        params = ParamsDict(finetune_form(FINETUNE))
        params.update(values)  # each value validated against its field, as the trigger form does
        return params.validate()

    values = filled(good)
    for bad in ({"lr": 0}, {"steps": 1.5}, {"latency_budget_ms": -3}, {"stages": "2"}, {"device_class": "pc"},
                {"model_name": "a b"}, {"student": "resnet50"}):
        with pytest.raises(ParamValidationError):
            filled(bad)
    params = airflow_here.pipeline_params(FINETUNE, values)
    assert params["device_classes"] == "iphone-15-pro-cpu" and "device_class" not in params
    from components.run import PipelineRun

    run = PipelineRun.create(FINETUNE, "artifacts", "r", params)
    assert FINETUNE.overrides(run.params) == ["student.model=vit_s", "stage2.iters=5", "stage3.iters=5",
                                              "stage2.lr=0.0001", "stage3.lr=0.0001"]
    assert not run.skipped(FINETUNE.step("train_stage2"))  # stages 2+3


def test_the_entry_point_skips_refuses_and_plans_without_airflow(tmp_path, capsys, monkeypatch):
    from components.task import SKIPPED, main

    monkeypatch.chdir(ROOT)  # the default config, configs/demo.yaml
    base = ["--pipeline", "eupe_retrain", "--run-id", "r", "--artifact-root", str(tmp_path)]
    assert main([*base, "--step", "train_stage1", "--params", '{"proxy": "p.safetensors"}']) == SKIPPED
    assert main([*base, "--step", "validate", "--params", '{"lr": 1}']) == 2  # not a parameter of eupe_retrain
    assert main([*base, "--step", "train_stage2"]) == 2  # its upstream steps never ran: bad input, not a retry
    assert "eupe: error: train_stage2: " in capsys.readouterr().err
    assert main([*base, "--step", "export", "--plan", "--xcom-file", str(tmp_path / "x.json")]) == 0
    variants = json.loads((tmp_path / "x.json").read_text())  # configs/demo.yaml: 64 px, fp32 and int8
    assert [v["name"] for v in variants] == ["student_64px_fp32", "student_64px_int8"]


# --------------------------------------------------------------------------- exit codes and retries


def test_exit_codes_become_retries_failures_gate_failures_and_skips(airflow_here):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

    raise_for_exit = airflow_here.raise_for_exit
    raise_for_exit("s", 0, [])
    for code in (1, 137, -9):  # a crash, a kill: retried
        with pytest.raises(AirflowException) as e:
            raise_for_exit("s", code, ["Traceback ...", "RuntimeError: boom"])
        assert not isinstance(e.value, (AirflowFailException, AirflowSkipException)) and "retried" in str(e.value)
    with pytest.raises(AirflowFailException, match=r"bad input \(exit 2, not retried\): eupe: error: --data: nope"):
        raise_for_exit("s", 2, ["eupe: error: --data: nope", "some trailing log line"])
    with pytest.raises(AirflowFailException, match=r"gate failed \(exit 3, not retried\): eupe: error: seg_miou"):
        raise_for_exit("s", 3, ["eupe: error: seg_miou 0.1 < baseline 0.3 - 0.02"])
    with pytest.raises(AirflowSkipException):
        raise_for_exit("s", 99, [])
    with pytest.raises(AirflowException, match=r"preempted \(exit 143, retried.*\): eupe: preempted: SIGTERM") as e:
        raise_for_exit("s", 143, ["eupe: preempted: SIGTERM at stage2 step 5/40: checkpoint saved", "trailing"])
    assert not isinstance(e.value, (AirflowFailException, AirflowSkipException))


def test_task_settings_follow_the_graph(airflow_here):
    from airflow.sdk import TriggerRule

    dag = airflow_here.build_dag(RETRAIN, schedule=None, settings=airflow_here.Settings(retry_delay_s=30))
    for step in RETRAIN.steps:
        task = dag.task_dict[step.name]
        assert (task.retries, task.retry_exponential_backoff) == (step.retries, 2.0)  # True would mean x1 here
        assert task.retry_delay.total_seconds() == 30 and task.max_retry_delay.total_seconds() == 3600
        expected = TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS if step.needs else TriggerRule.ALL_SUCCESS
        assert task.trigger_rule == expected, step.name  # past a skipped stage 1, never past a failure
    assert dag.task_dict["train_stage2"].retries == 3 and RETRAIN.step("train_stage2").resumable
    assert dag.max_active_runs == 1 and dag.task_dict["promote"].max_active_tis_per_dag == 1


def test_the_embedded_task_streams_the_step_and_fails_a_bad_input_at_once(airflow_here, tmp_path):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"args: $*\"\necho 'eupe: error: --data: not found: /nope' >&2\n"
                    "exit ${FAKE_EXIT}\n")
    fake.chmod(0o755)
    dag = airflow_here.build_dag(RETRAIN, settings=airflow_here.Settings(python=str(fake), artifact_root=str(tmp_path)))
    task = dag.task_dict["validate"]
    logged: list[str] = []
    task.log.info = lambda fmt, *a: logged.append(fmt % a)  # type: ignore[method-assign]
    os.environ["FAKE_EXIT"] = "2"
    try:
        with pytest.raises(AirflowFailException, match="bad input .*eupe: error: --data: not found: /nope"):
            task.execute(context(dag, run_name="r1"))
        assert any("--run-id r1" in line and "--step validate" in line for line in logged)  # streamed to the log
        os.environ["FAKE_EXIT"] = "1"
        with pytest.raises(AirflowException, match="retried") as e:
            task.execute(context(dag, run_name="r1"))
        assert not isinstance(e.value, AirflowFailException)
    finally:
        del os.environ["FAKE_EXIT"]
    with pytest.raises(AirflowSkipException, match="proxy"):  # a reused proxy: no stage 1, nothing spawned
        dag.task_dict["train_stage1"].execute(context(dag, proxy="s3://b/proxy.safetensors"))
    with pytest.raises(AirflowSkipException, match="own dataset version"):
        ctx = context(dag, run_id="asset_triggered__2026-01-06")
        ctx["triggering_asset_events"] = {"data": [type("E", (), {"source_dag_id": "eupe_retrain"})()]}
        task.execute(ctx)


def test_a_dataset_version_is_an_asset_event_only_when_its_hash_is_new(airflow_here):
    s = airflow_here.Settings(dataset_uri="s3://ml/lvd")
    dag = airflow_here.build_dag(RETRAIN, schedule=airflow_here.retrain_schedule(RETRAIN, s), settings=s)
    task = dag.task_dict["version_data"]
    (scheduled,) = dag.timetable.asset_condition.objects  # what retraining is scheduled on, besides the cron
    assert task.inlets == [scheduled] and task.dataset[0] == scheduled
    added = []
    ctx = context(dag, dataset_uri="s3://ml/lvd")
    ctx["outlet_events"] = {task.dataset[1]: SimpleNamespace(add=lambda asset, extra: added.append((asset.uri, extra)))}
    ctx["inlet_events"] = {scheduled: [SimpleNamespace(extra={"hash": "old.dir"})]}
    assert task.finished(ctx, {"hash": "old.dir"}) == {"hash": "old.dir"} and added == []  # unchanged data
    task.finished(ctx, {"hash": "new.dir"})
    assert added == [("s3://ml/lvd", {"hash": "new.dir", "run_id": "manual__t"})]


# --------------------------------------------------------------------------- cluster mode


def test_cluster_mode_renders_pods_with_the_steps_image_command_and_resources(airflow_here, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
    from kubernetes.client import models as k8s

    settings = airflow_here.Settings(mode="cluster", image="registry.example/eupe:1.2",
                                     gpu_image="registry.example/eupe-cuda:1.2", artifact_root="s3://ml/eupe",
                                     namespace="ml", s3_secret="eupe-s3-credentials",
                                     pushgateway="eupe-pushgateway.ml.svc:9091")
    dag = airflow_here.build_dag(RETRAIN, schedule=None, settings=settings)

    def pod(task_id: str, **params) -> k8s.V1Pod:
        task = dag.task_dict[task_id]
        task.__dict__["hook"] = SimpleNamespace(  # no cluster: the hook is only asked these
            is_in_cluster=False, get_namespace=lambda: None, get_xcom_sidecar_container_image=lambda: None,
            get_xcom_sidecar_container_resources=lambda: None)
        return task.build_pod_request_obj(context(dag, "scheduled__2026-01-05", task, **params))

    train = pod("train_stage2", run_name="w2")
    (c,) = train.spec.containers
    assert (c.image, c.command) == ("registry.example/eupe-cuda:1.2", ["python", "-m", "components.task"])
    assert c.args[:8] == ["--pipeline", "eupe_retrain", "--run-id", "w2", "--artifact-root", "s3://ml/eupe",
                          "--params", c.args[7]] and c.args[8:] == ["--step", "train_stage2"]
    assert json.loads(c.args[7])["config"] == "configs/demo.yaml"
    gpus = {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8"}
    assert c.resources.requests == c.resources.limits == gpus
    assert train.spec.security_context.run_as_non_root is True and c.security_context.run_as_non_root is True
    assert c.security_context.allow_privilege_escalation is False and c.security_context.read_only_root_filesystem
    assert c.security_context.capabilities.drop == ["ALL"] and c.security_context.seccomp_profile.type == "RuntimeDefault"
    mounts = {m.mount_path: m.name for m in c.volume_mounts}
    assert {"/tmp", "/dev/shm", {e.name: e.value for e in c.env}["EUPE_CACHE"]} <= set(mounts)  # writable scratch
    assert {v.name for v in train.spec.volumes} >= set(mounts.values())
    assert [e.secret_ref.name for e in c.env_from] == ["eupe-s3-credentials"]
    assert {e.name: e.value for e in c.env}["EUPE_PUSHGATEWAY"] == "eupe-pushgateway.ml.svc:9091"  # the step's metrics
    assert train.metadata.namespace == "ml" and train.spec.restart_policy == "Never"
    assert any(t.key == "nvidia.com/gpu" for t in train.spec.tolerations)

    (v,) = pod("validate").spec.containers
    assert v.image == "registry.example/eupe:1.2" and v.args[3] == "scheduled__2026-01-05"  # Airflow's run id
    assert v.resources.requests == v.resources.limits == {"cpu": "4", "memory": "8Gi"}  # no GPU asked

    planner = pod("plan_export")
    assert planner.spec.containers[0].args[-3:] == ["--plan", "--xcom-file", "/airflow/xcom/return.json"]
    assert [x.name for x in planner.spec.containers] == ["base", "airflow-xcom-sidecar"]  # the XCom sidecar
    version = pod("version_data")  # returns its metrics: the dataset's hash, for the asset event
    assert version.spec.containers[0].args[-2:] == ["--xcom-file", "/airflow/xcom/return.json"]
    assert [a.name for a in dag.task_dict["version_data"].outlets] == ["eupe_retrain__dataset_versions"]
    export = dag.task_dict["export"]  # mapped over the planner's elements
    assert export.partial_kwargs["container_resources"].limits == {"cpu": "4", "memory": "16Gi"}
    assert export.partial_kwargs["image"] == "registry.example/eupe:1.2"
    assert set(export.expand_input.value) == {"item"}

    with pytest.raises(AirflowSkipException, match="proxy"):  # decided before any pod is created
        dag.task_dict["train_stage1"].execute(context(dag, proxy="s3://ml/proxy.safetensors"))

    # A failed pod: the pod operator's own cleanup raises; the container's exit code decides what it becomes.
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from airflow.sdk.exceptions import AirflowException

    def failed(self, pod, remote_pod):
        raise AirflowException(f"Pod {pod.metadata.name} returned a failure.\nremote_pod: ...")

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", failed)
    evaluate = dag.task_dict["evaluate"]
    for code, message in ((3, "gate failed"), (2, "bad input"), (1, None), (137, None)):
        terminated = k8s.V1ContainerStateTerminated(exit_code=code)
        remote = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="evaluate-x", namespace="ml"), status=k8s.V1PodStatus(
            phase="Failed", container_statuses=[k8s.V1ContainerStatus(
                name="base", image="i", image_id="i", ready=False, restart_count=0,
                state=k8s.V1ContainerState(terminated=terminated))]))
        with pytest.raises(AirflowException, match=message or "returned a failure") as e:
            evaluate.cleanup(remote, remote)
        assert isinstance(e.value, AirflowFailException) == (message is not None)  # 1, a kill: retried


def test_settings_come_from_airflow_variables(airflow_here, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_MODE", "cluster")
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_ARTIFACT_ROOT", "s3://ml/eupe")
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_RETRAIN_SCHEDULE", "0 4 * * *")
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_DATASET_URI", "s3://ml/lvd/")
    s = airflow_here.Settings.load()
    assert (s.mode, s.artifact_root, s.image) == ("cluster", "s3://ml/eupe", "eupe:latest")
    schedule = airflow_here.retrain_schedule(RETRAIN, s)
    assert schedule.timetable.expression == "0 4 * * *"  # weekly by default, a setting
    assert [a.uri for a in schedule.asset_condition.objects] == ["s3://ml/lvd"]  # and on each new dataset version
    monkeypatch.setenv("AIRFLOW_VAR_EUPE_MODE", "kubernetes")
    with pytest.raises(ValueError, match="eupe_mode"):
        airflow_here.Settings.load()


# --------------------------------------------------------------------------- real runs


def test_a_bad_input_fails_its_task_at_once_and_is_not_retried(airflow_home, tmp_path):
    started = time.perf_counter()
    proc = dags_test(airflow_home, "eupe_domain_finetune",
                     {"dataset_uri": str(tmp_path / "missing"), "run_name": "bad"}, timeout=600,
                     artifact_root=tmp_path / "artifacts", retry_delay_s=1)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    states = task_instances(airflow_home, "eupe_domain_finetune")
    assert states[("validate", -1)] == ("failed", 1)  # one try: exit 2 is never retried
    assert states[("train_stage3", -1)][0] == "upstream_failed" and states[("promote", -1)][0] == "upstream_failed"
    assert "bad input (exit 2, not retried): eupe: error:" in output and "missing" in output
    print(f"failed run: {time.perf_counter() - started:.1f} s")




@pytest.fixture(scope="module")
def retrain(airflow_home, tmp_path_factory):
    """`airflow dags test eupe_retrain` on the tiny recipe, train_stage2 killed once after its first checkpoint."""
    from conftest import pipeline_workspace

    tmp_path = tmp_path_factory.mktemp("retrain")
    config = pipeline_workspace(tmp_path)  # a DVC repository with a local-folder remote holding the tiny dataset
    (tmp_path / "marks").mkdir()
    conf = {"run_name": "t1", "config": str(config), "dataset_uri": str(tmp_path / "data"), "model_name": "tiny",
            "latency_budget_ms": "60000"}
    os.environ.update(FLAKY_REAL_PYTHON=sys.executable, FLAKY_STEP="train_stage2", FLAKY_MARKER_DIR=str(tmp_path / "marks"))
    started = time.perf_counter()
    try:
        proc = dags_test(airflow_home, "eupe_retrain", conf, timeout=1500, artifact_root=tmp_path / "artifacts",
                         python=FLAKY, retry_delay_s=1, dataset_uri=tmp_path / "data")
    finally:
        for k in ("FLAKY_REAL_PYTHON", "FLAKY_STEP", "FLAKY_MARKER_DIR"):
            os.environ.pop(k)
    print(f"airflow dags test eupe_retrain: {time.perf_counter() - started:.1f} s")
    return tmp_path, config, proc


@pytest.mark.slow
def test_retrain_runs_end_to_end_on_airflow_and_a_killed_training_step_resumes(airflow_home, retrain):
    tmp_path, _, proc = retrain
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]

    states = task_instances(airflow_home, "eupe_retrain")
    assert {s for s, _ in states.values()} == {"success"}, states  # every task green
    expected = {(s.name, 0 if s.expand else -1) for s in RETRAIN.steps} | {
        ("plan_export", -1), ("plan_latency", -1), ("plan_version_checkpoints", -1), ("summary", -1),
        ("version_checkpoints", 1), ("version_checkpoints", 2)}  # one export, one latency run, three stages versioned
    assert set(states) == expected
    assert states[("train_stage2", -1)] == ("success", 2)  # killed once (exit 1), retried
    assert all(n == 1 for (t, _), (_, n) in states.items() if t != "train_stage2")
    assert "killed train_stage2 after its first checkpoint" in output and "(retried)" in output
    assert "resumed from" in output.split("killed train_stage2", 1)[1]  # the retry continued from the checkpoint

    run = tmp_path / "artifacts" / "runs" / "eupe_retrain" / "t1"
    pointer = json.loads((tmp_path / "artifacts" / "models" / "tiny" / "production.json").read_text())
    assert pointer["version"] == 1 and pointer["run_id"] == "t1"
    assert json.loads((run / "promote" / "result.json").read_text())["metrics"]["published"] is True
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["stage1", "stage2", "stage3"] and list(summary["latency"]) == [
        "student_32px_fp32_ci-cpu"]
    assert "latency run" in output and "student_32px_fp32_ci-cpu" in output  # the table, in the summary task's log

    digest = json.loads((run / "version_data" / "result.json").read_text())["metrics"]["hash"]
    with sqlite3.connect(airflow_home / "airflow.db") as db:  # the dataset's asset event, which retraining is on
        events = db.execute("SELECT a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                            "WHERE e.source_dag_id = 'eupe_retrain'").fetchall()
        scheduled = db.execute("SELECT r.dag_id, a.uri FROM dag_schedule_asset_reference r "
                               "JOIN asset a ON a.id = r.asset_id").fetchall()
    assert [(uri, json.loads(extra)["hash"]) for uri, extra in events] == [((tmp_path / "data").as_uri(), digest)]
    assert ("eupe_retrain", (tmp_path / "data").as_uri()) in scheduled  # (a paused DAG: no run queued here)


@pytest.mark.slow
def test_make_demos_live_view_reads_a_real_runs_output(airflow_home, retrain, tmp_path):
    """`make demo` pipes `airflow dags test` through tools/dag_progress.awk: on this real run's output it shows
    every task's start and end with its state (the killed training's failed try, then its success), the
    training's progress lines, and keeps the whole output for the log."""
    _, _, proc = retrain
    output = proc.stdout + proc.stderr
    log = tmp_path / "demo.log"
    view = subprocess.run(["awk", "-v", f"logfile={log}", "-f", str(ROOT / "tools" / "iso_seconds.awk"),
                           "-f", str(ROOT / "tools" / "dag_progress.awk")],
                          input=output + "eupe-dag-exit 0\n", capture_output=True, text=True, check=True).stdout
    lines = [line.split("] ", 1)[1] for line in view.splitlines()]
    ended = [line.split(":")[0] for line in lines if ": success in " in line]
    states = task_instances(airflow_home, "eupe_retrain")
    assert sorted(ended) == sorted(t if m < 0 else f"{t}[{m}]" for t, m in states)  # every task, once green
    tries = [line for line in lines if line.startswith("train_stage2")]
    assert tries[0] == "train_stage2 ..." and tries[1].startswith("train_stage2: up_for_retry in ")
    assert tries[-1].startswith("train_stage2: success in ")
    assert any(line.startswith("  stage1: ") and " step (" in line for line in lines)  # the step's progress
    assert log.read_text() == output

@pytest.mark.slow
def test_a_domain_finetune_from_the_form_skips_stage_2_and_publishes_under_its_own_name(airflow_home, retrain):
    tmp_path, config, first = retrain
    assert first.returncode == 0
    trained = tmp_path / "artifacts" / "runs" / "eupe_retrain" / "t1"
    base = str(trained / "train_stage3" / json.loads((trained / "train_stage3" / "result.json").read_text())[
        "artifacts"]["checkpoint_model"])  # written relative to result.json
    form = {"run_name": "d1", "config": str(config), "dataset_uri": str(tmp_path / "data"), "base_checkpoint": base,
            "proxy": str(trained / "train_stage1" / "encoder.safetensors"), "student": "vit_t", "stages": "3",
            "steps": 4, "lr": 5e-4, "latency_budget_ms": 60000, "device_class": "ci-cpu", "model_name": "tiny_domain"}
    started = time.perf_counter()
    proc = dags_test(airflow_home, "eupe_domain_finetune", form, timeout=1200, artifact_root=tmp_path / "artifacts",
                     retry_delay_s=1)
    output = proc.stdout + proc.stderr
    print(f"airflow dags test eupe_domain_finetune: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, output[-5000:]
    states = task_instances(airflow_home, "eupe_domain_finetune")
    skipped = {"normalize_stage2", "train_stage2"}  # stages "3": the run continues past them
    assert {t for (t, _), (state, _) in states.items() if state == "skipped"} == skipped, states
    assert {state for (t, _), (state, _) in states.items() if t not in skipped} == {"success"}, states
    run = tmp_path / "artifacts" / "runs" / "eupe_domain_finetune" / "d1"
    stage3 = json.loads((run / "train_stage3" / "result.json").read_text())
    assert stage3["metrics"]["steps"] == 4  # the form's steps, as stage3.iters
    assert "--init " + base in output and "--set student.model=vit_t" in output and "--device-class ci-cpu" in output
    pointer = json.loads((tmp_path / "artifacts" / "models" / "tiny_domain" / "production.json").read_text())
    assert pointer["version"] == 1 and pointer["run_id"] == "d1"  # the domain's own name, beside "tiny"
    assert (tmp_path / "artifacts" / "models" / "tiny" / "production.json").is_file()
