"""The Kubeflow pipelines built from the step graph (components.kfp_pipeline): compiled, every step of the graph
is in the YAML with its resources, retries, caching and image, the fan-out and the gates are there and the
parameters are the Airflow DAG's; and eupe_retrain run end to end under kfp.local (SubprocessRunner, this
environment) on the tiny recipe, with the outputs the local runner and Airflow produce."""

import json
from pathlib import Path

import pytest
import yaml

from components import kfp_pipeline
from components.graph import PIPELINES, RETRAIN
from components.plan import items
from components.run import PipelineRun
from conftest import pipeline_workspace



@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both pipelines compiled with a test image and a test artifact root."""
    out = tmp_path_factory.mktemp("kfp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EUPE_IMAGE", "registry.test/eupe:kfp-test")
        mp.setenv("EUPE_GPU_IMAGE", "registry.test/eupe-cuda:kfp-test")
        paths = kfp_pipeline.compile_all(str(out), "s3://bucket/eupe")
    return {p.stem: yaml.safe_load(p.read_text()) for p in paths}


def _tasks(spec: dict, dag: dict | None = None, path: tuple = ()) -> dict:
    """Every task of the compiled pipeline, nested DAGs (conditions, loops) included: name -> (task, groups)."""
    dag = spec["root"]["dag"] if dag is None else dag
    found = {}
    for name, task in dag["tasks"].items():
        found[name] = (task, path)
        sub = spec["components"][task["componentRef"]["name"]].get("dag")
        if sub:
            found.update(_tasks(spec, sub, path + (name,)))
    return found


def _executor(spec: dict, task: dict) -> dict:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_step_is_a_task_with_its_resources_retries_and_image(compiled, name):
    spec, pipeline = compiled[name], PIPELINES[name]
    tasks = _tasks(spec)
    for step in pipeline.steps:
        task, groups = tasks[step.name.replace("_", "-")]
        assert task["taskInfo"]["name"] == step.name
        container = _executor(spec, task)
        r = container["resources"]
        assert (r["resourceCpuRequest"], r["resourceCpuLimit"]) == (step.resources.cpu,) * 2
        assert (r["resourceMemoryRequest"], r["resourceMemoryLimit"]) == (step.resources.memory,) * 2
        if step.resources.gpus:
            assert r["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert r["accelerator"]["resourceCount"] == str(step.resources.gpus)
            assert container["image"] == "registry.test/eupe-cuda:kfp-test"
        else:
            assert "accelerator" not in r and container["image"] == "registry.test/eupe:kfp-test"
        retry = task["retryPolicy"]
        assert retry["maxRetryCount"] == step.retries and retry["backoffDuration"] == "60s"
        assert retry["backoffFactor"] == 2
        cached = step.name.startswith(("validate", "version", "normalize", "export", "evaluate", "compare",
                                        "ablation_report"))
        assert task["cachingOptions"].get("enableCache", False) is cached, step.name
        assert any(a == "--function_to_execute" for a in container["args"])  # a lightweight component
        assert "components.kfp_components" in container["command"][-1]  # which runs the step's entry point
        assert ("parameterIterator" in tasks[groups[-1]][0]) == bool(step.expand) if groups else not step.expand
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.test/eupe:kfp-test", "registry.test/eupe-cuda:kfp-test"}
    if "promote" in tasks:  # (the ablation publishes nothing)
        assert not tasks["promote"][0]["cachingOptions"].get("enableCache", False)


def test_one_image_setting_reaches_every_executor(tmp_path, monkeypatch):
    from kfp import compiler

    monkeypatch.setenv("EUPE_IMAGE", "registry.test/eupe:only")
    monkeypatch.delenv("EUPE_GPU_IMAGE", raising=False)
    compiler.Compiler().compile(kfp_pipeline.build_pipeline(RETRAIN), str(tmp_path / "p.yaml"))
    executors = yaml.safe_load((tmp_path / "p.yaml").read_text())["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.test/eupe:only"}


def test_the_ablation_fans_out_per_seed_and_reports_over_all(compiled):
    tasks = _tasks(compiled["eupe_ablation"])
    loops = {n for n, (t, _) in tasks.items() if "parameterIterator" in t}
    assert len(loops) == 1 and "ablation-all" in tasks and "plan-ablation" in tasks
    loop = tasks[tasks["ablation"][1][-1]][0]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-ablation-Output"
    assert "promote" not in tasks and "ablation-report" in tasks


@pytest.mark.parametrize("name", sorted(set(PIPELINES) - {"eupe_ablation"}))
def test_fan_out_and_gates_guard_promote(compiled, name):
    spec = compiled[name]
    tasks = _tasks(spec)
    loops = {n: t for n, (t, _) in tasks.items() if "parameterIterator" in t}
    fanned = [s.name.replace("_", "-") for s in PIPELINES[name].steps if s.expand]
    assert {"export", "latency"} <= set(fanned) and len(loops) == len(fanned)
    for n in fanned:  # a ParallelFor over its planner's output, then a fan-in the later steps read
        loop = tasks[tasks[n][1][-1]][0]
        assert loop["parameterIterator"]["items"]["inputParameter"] == f"pipelinechannel--plan-{n}-Output"
        assert f"{n}-all" in tasks
    _, promote_groups = tasks["promote"]
    conditions = [tasks[g][0]["triggerPolicy"]["condition"] for g in promote_groups if "triggerPolicy" in tasks[g][0]]
    assert conditions == ["inputs.parameter_values['pipelinechannel--evaluate-passed'] == true",
                          "inputs.parameter_values['pipelinechannel--latency-all-passed'] == true"]
    for gate in ("quality", "latency"):
        _, groups = tasks[f"{gate}-gate-failed"]
        assert tasks[groups[-1]][0]["triggerPolicy"]["condition"].startswith("!(")
    lineage = tasks["promote"][0]["inputs"]["artifacts"]
    assert {a.get("taskOutputArtifact", {}).get("producerTask") or a["componentInputArtifact"] for a in lineage.values()}
    assert spec["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]["metrics"]["artifactType"][
        "schemaTitle"] == "system.Metrics"
    assert spec["components"]["comp-train-stage3"]["outputDefinitions"]["artifacts"]["out"]["artifactType"][
        "schemaTitle"] == "system.Model"
    assert spec["components"]["comp-validate"]["outputDefinitions"]["artifacts"]["out"]["artifactType"][
        "schemaTitle"] == "system.Dataset"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_parameters_are_the_airflow_dags(compiled, name):
    from components.airflow_params import dag_params, finetune_form

    pipeline = PIPELINES[name]
    form = finetune_form(pipeline) if name == "eupe_domain_finetune" else dag_params(pipeline)
    params = compiled[name]["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(form)
    assert {k: p["defaultValue"] for k, p in params.items()} == {
        k: "" if p.value is None else str(p.value) for k, p in form.items()}


def test_a_step_wider_than_the_slots_is_refused():
    from kfp import dsl

    from components.graph import Pipeline, Step

    wide = Pipeline("wide", "", tuple(Step(f"s{i}", ("x", "--out", "{out}"), {}) for i in range(7)) + (
        Step("all", tuple(f"{{dir:s{i}}}" for i in range(7)), {}),))
    with pytest.raises(ValueError, match="reads 7 steps"):
        dsl.pipeline(name="wide")(lambda: kfp_pipeline.Builder(wide, "artifacts", "r", {}).add(list(wide.steps)))


# --------------------------------------------------------------------------- what a component does with an exit code


def _outputs(tmp_path):
    from kfp import dsl

    return dsl.Artifact(name="out", uri=str(tmp_path / "out")), dsl.Metrics(name="metrics", uri=str(tmp_path / "m"))


def test_a_step_the_parameters_make_unnecessary_is_a_no_op(tmp_path):
    from components import kfp_components as kc

    out, metrics = _outputs(tmp_path)
    assert kc.run_step("eupe_retrain", "train_stage1", "r1", str(tmp_path), {"proxy": "p.safetensors"}, "", False,
                       out, metrics) == (True,)  # exit 99 before anything runs: the component succeeds
    assert out.metadata["skipped"] is True and json.loads(Path(out.path).read_text())["status"] == "skipped"
    assert not (tmp_path / "runs" / "eupe_retrain" / "r1" / "train_stage1").exists()


@pytest.mark.parametrize(("code", "gate", "expected"), [(0, True, True), (3, True, False), (3, False, SystemExit),
                                                        (2, True, SystemExit), (1, False, SystemExit)])
def test_a_gate_says_no_by_its_output_every_other_failure_fails_the_task(tmp_path, monkeypatch, code, gate, expected):
    import components.task
    from components import kfp_components as kc
    from eupe import storage

    run = PipelineRun.create(RETRAIN, str(tmp_path), "r1", {})
    storage.write_json(f"{run.out('evaluate')}/result.json", {"status": "ok" if code == 0 else "failed",
                                                               "metrics": {"knn_top1": 0.5, "gate_passed": code == 0}})
    monkeypatch.setattr(components.task, "main", lambda argv: code)
    out, metrics = _outputs(tmp_path)
    if expected is SystemExit:
        with pytest.raises(SystemExit) as e:
            kc.run_step("eupe_retrain", "evaluate", "r1", str(tmp_path), {}, "", gate, out, metrics)
        assert e.value.code == code  # the task fails with the step's own exit code (KFP retries it)
        return
    assert kc.run_step("eupe_retrain", "evaluate", "r1", str(tmp_path), {}, "", gate, out, metrics) == (expected,)
    assert metrics.metadata == {"knn_top1": 0.5, "gate_passed": float(expected)}
    assert out.metadata["passed"] is expected and out.metadata["folder"] == run.out("evaluate")


# --------------------------------------------------------------------------- a local run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A DVC repository (local-folder remote) holding a tiny dense dataset, and the tiny recipe."""
    root = tmp_path_factory.mktemp("workspace")
    config = pipeline_workspace(root)
    return root, config


@pytest.mark.slow
def test_eupe_retrain_runs_end_to_end_under_kfp_local(workspace):
    from kfp import local

    root, config = workspace
    artifacts = root / "artifacts"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"))
    pipeline = kfp_pipeline.build_pipeline(RETRAIN, str(artifacts))
    pipeline(config=str(config), dataset_uri=str(root / "data"), model_name="tiny", latency_budget_ms="60000",
             run_name="k1")

    run = PipelineRun.create(RETRAIN, str(artifacts), "k1", {"config": str(config), "dataset_uri": str(root / "data"),
                                                              "model_name": "tiny", "latency_budget_ms": "60000"})
    for step in RETRAIN.steps:
        for item in items(run, step.expand):
            assert run.result(step.name, item)["status"] == "ok", step.name
    pointer = json.loads((artifacts / "models" / "tiny" / "production.json").read_text())
    assert pointer["version"] == 1 and pointer["run_id"] == "k1"
    assert (artifacts / "models" / "tiny" / "1").is_dir() and run.result("promote")["metrics"]["published"] is True
    assert (Path(run.root) / "summary.json").is_file()

    # the KFP artifacts: evaluate's Metrics hold the eval metrics of its result.json, its out that result.json
    (task_dir,) = (root / "kfp").glob("*/evaluate")
    outputs = json.loads((task_dir / "executor_output.json").read_text())
    assert outputs["parameterValues"] == {"passed": True}
    (metrics,) = outputs["artifacts"]["metrics"]["artifacts"]
    eval_metrics = {k: float(v) for k, v in run.result("evaluate")["metrics"].items() if isinstance(v, (int, float))}
    assert {"knn_top1", "seg_miou", "depth_rmse", "keypoint_pck"} <= set(eval_metrics)
    assert metrics["metadata"] == pytest.approx(eval_metrics)
    (out,) = outputs["artifacts"]["out"]["artifacts"]
    assert out["metadata"]["folder"] == run.out("evaluate") and out["metadata"]["passed"] is True
    assert json.loads(Path(out["uri"]).read_text()) == run.result("evaluate")
    (promoted,) = json.loads(next((root / "kfp").glob("*/promote/executor_output.json")).read_text())[
        "artifacts"]["out"]["artifacts"]
    assert promoted["metadata"]["status"] == "ok"
