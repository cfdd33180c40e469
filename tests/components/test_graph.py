"""The step graph: edges from references, and each step's command line resolved for one run."""

import json
from pathlib import Path

import pytest

from components.graph import FINETUNE, PIPELINES, RETRAIN, Pipeline, Step
from components.plan import items
from components.run import PipelineRun, UnresolvedReference


def _done(run: PipelineRun, step: str, artifacts: dict, item: dict | None = None, metrics: dict | None = None) -> None:
    out = Path(run.out(step, item))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"step": step, "status": "ok", "artifacts": artifacts,
                                                 "metrics": metrics or {}}))


def test_edges_come_from_the_references_and_gates():
    needs = {s.name: set(s.needs) for s in RETRAIN.steps}
    assert needs["train_stage2"] == {"train_stage1", "normalize_stage2"}
    assert needs["train_stage3"] == {"train_stage1", "train_stage2", "normalize_stage3"}
    assert needs["export"] == {"train_stage3", "evaluate"}  # nothing is exported before the quality gate
    assert needs["latency"] == {"export"}
    assert needs["version_checkpoints"] == {"latency"}  # versioned only once both gates passed
    assert needs["promote"] == {"train_stage3", "evaluate", "export", "latency", "version_data", "version_checkpoints"}
    assert needs["evaluate"] == {"train_stage1", "train_stage3", "normalize_stage3", "compare"}
    assert needs["teachers"] == {"validate"} and "teachers" in needs["train_stage1"] and "teachers" in needs["compare"]
    assert needs["compare"] == {"teachers", "train_stage1", "train_stage3"}  # every encoder, beside the student's gate
    assert "train_stage1" not in {n for s in FINETUNE.steps for n in s.needs}
    assert sorted(PIPELINES) == ["eupe_ablation", "eupe_domain_finetune", "eupe_retrain"]
    ablation = {s.name: set(s.needs) for s in PIPELINES["eupe_ablation"].steps}
    assert ablation == {"validate": set(), "teachers": {"validate"}, "ablation": {"teachers", "validate"},
                        "ablation_report": {"ablation"}}  # one ablation element per seed, the report over all


def test_a_step_reading_a_later_or_unknown_step_is_refused_at_declaration():
    a = Step("a", ("x", "--in", "{b:out}"), {})
    with pytest.raises(ValueError, match="p.a reads 'b', which is not an earlier step"):
        Pipeline("p", "", (a, Step("b", ("y",), {})))


def test_commands_resolve_upstream_outputs_params_and_alternatives(tmp_path):
    run = PipelineRun.create(RETRAIN, str(tmp_path), "manual__2026-12-01T00:00:00+00:00",
                             {"config": "c.yaml", "dataset_uri": "s3://b/lvd/"})
    assert run.root == f"{tmp_path}/runs/eupe_retrain/manual__2026-12-01T00_00_00+00_00"
    _done(run, "validate", {"manifest": "m.parquet"})
    _done(run, "train_stage1", {"encoder": "proxy.safetensors"})
    argv = run.command(RETRAIN.step("normalize_stage2"))
    proxy = f"{run.out('train_stage1')}/proxy.safetensors"  # result.json names it relative to itself
    assert argv == ["normalize", "--config", "c.yaml", "--data", "s3://b/lvd/", "--proxy", proxy,
                    "--manifest", f"{run.out('validate')}/m.parquet", "--stage", "2", "--out", run.out("normalize_stage2")]
    reused = PipelineRun.create(RETRAIN, str(tmp_path), "r2", {"proxy": "s3://models/proxy.safetensors"})
    assert reused.skipped(RETRAIN.step("train_stage1")) and not reused.skipped(RETRAIN.step("train_stage2"))
    _done(reused, "validate", {"manifest": "m.parquet"})
    assert "s3://models/proxy.safetensors" in reused.command(RETRAIN.step("normalize_stage2"))


def test_training_resumes_an_empty_baseline_is_dropped_and_a_missing_output_is_named(tmp_path):
    run = PipelineRun.create(RETRAIN, str(tmp_path), "r1")
    _done(run, "normalize_stage1", {"stats": "n1.safetensors"})
    assert run.command(RETRAIN.step("train_stage1"))[-2:] == ["--resume", "auto"]
    for step, arts in (("train_stage1", {"encoder": "p"}), ("normalize_stage3", {"stats": "n3"}),
                       ("train_stage3", {"encoder": "e", "checkpoint_model": "m"})):
        _done(run, step, arts)
    evaluate = run.command(RETRAIN.step("evaluate"))
    assert "--baseline" not in evaluate  # no production model yet: no gate
    assert json.loads((Path(run.root) / "baselines.json").read_text()) == {"eupe_student": ""}
    with pytest.raises(UnresolvedReference, match="train_stage2 has no result"):
        run.command(RETRAIN.step("train_stage3"))


def test_fine_tune_parameters_become_config_overrides_and_stage_2_is_optional(tmp_path):
    run = PipelineRun.create(FINETUNE, str(tmp_path), "f1", {"stages": "3", "steps": 40, "lr": 1e-4,
                                                             "base_checkpoint": "s3://m/base.safetensors"})
    assert run.skipped(FINETUNE.step("train_stage2"))
    _done(run, "normalize_stage3", {"stats": "n3"})
    argv = run.command(FINETUNE.step("train_stage3"))
    assert argv[argv.index("--init") + 1] == "s3://m/base.safetensors"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["stage2.iters=40", "stage3.iters=40", "stage2.lr=0.0001", "stage3.lr=0.0001"]


def test_promote_gets_one_flag_per_fanned_out_element(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("export: {resolutions: [32, 48], int8: true}\nlatency: {device_class: ci-cpu}\n")
    run = PipelineRun.create(RETRAIN, str(tmp_path), "r1", {"config": str(config), "model_name": "m"})
    _done(run, "teachers", {"pecore": "pecore.safetensors"}, metrics={"trained": ["pecore"]})  # a zoo was trained
    for stage in (1, 2, 3):
        _done(run, f"train_stage{stage}", {"encoder": "e", "checkpoint": f"ck{stage}"})
    for r in (32, 48):
        for d in ("fp32", "int8"):
            name = f"student_{r}px_{d}"
            _done(run, "export", {name: f"{name}.pte"}, {"name": name})
    for d in ("fp32", "int8"):  # two sizes: one more export per dtype, the .pte with a method per size
        name = f"student_multires_{d}"
        _done(run, "export", {name: f"{name}.pte"}, {"name": name})
    variants = items(run, "export_variants")
    single, multi = run.command(RETRAIN.step("export"), variants[0]), run.command(RETRAIN.step("export"), variants[-1])
    assert single[single.index("--resolution") + 1] == "32" and "--only" not in single
    assert "--resolution" not in multi and multi[multi.index("--only") + 1] == "multires"
    argv = run.command(RETRAIN.step("promote"))
    exports = [argv[i + 1] for i, a in enumerate(argv) if a == "--export"]
    latencies = [argv[i + 1] for i, a in enumerate(argv) if a == "--latency"]
    assert [Path(e).name for e in exports] == ["student_32px_fp32", "student_32px_int8", "student_48px_fp32",
                                               "student_48px_int8", "student_multires_fp32", "student_multires_int8"]
    assert [Path(x).name for x in latencies] == [f"{Path(e).name}_ci-cpu" for e in exports]
    assert argv[argv.index("--registry") + 1] == str(tmp_path) and argv[argv.index("--run-id") + 1] == "r1"
    versions = [argv[i + 1] for i, a in enumerate(argv) if a == "--checkpoint-version"]
    assert [Path(v).name for v in versions] == ["teachers", "train_stage1", "train_stage2", "train_stage3"]
    assert items(run, "trained_checkpoints")[0] == {"name": "teachers", "checkpoint": run.out("teachers")}
    proxy_reused = PipelineRun.create(RETRAIN, str(tmp_path), "r1", {"config": str(config), "proxy": "p.safetensors"})
    assert [i["name"] for i in items(proxy_reused, "trained_checkpoints")] == ["train_stage2", "train_stage3"]


def test_a_skipped_steps_output_is_unset_not_an_error(tmp_path):
    run = PipelineRun.create(FINETUNE, str(tmp_path), "f2", {"stages": "3", "base_checkpoint": ""})
    _done(run, "normalize_stage3", {"stats": "n3"})
    assert "--init" not in run.command(FINETUNE.step("train_stage3"))  # no stage 2, no base: from the config


def test_stage_1_loads_the_teacher_zoo_and_compare_measures_every_encoder(tmp_path):
    run = PipelineRun.create(RETRAIN, str(tmp_path), "r1", {"config": "c.yaml", "dataset_uri": "d"})
    assert run.command(RETRAIN.step("teachers")) == ["teachers", "train", "--config", "c.yaml", "--data", "d", "--out",
                                                     run.out("teachers"), "--resume", "auto"]
    _done(run, "validate", {"manifest": "m.parquet"})
    _done(run, "normalize_stage1", {"stats": "n1.safetensors"})
    for step in ("normalize_stage1", "train_stage1"):  # the zoo's folder: its train: teachers load from there
        argv = run.command(RETRAIN.step(step))
        assert argv[argv.index("--teachers") + 1] == run.out("teachers")
    _done(run, "train_stage1", {"encoder": "proxy.safetensors"})
    _done(run, "train_stage3", {"encoder": "student.safetensors"})
    argv = run.command(RETRAIN.step("compare"))
    assert argv[:2] == ["evaluate", "--compare"] and argv[argv.index("--teachers") + 1] == run.out("teachers")
    assert argv[argv.index("--proxy") + 1].endswith("proxy.safetensors")
    assert argv[argv.index("--weights") + 1].endswith("student.safetensors")
    reused = PipelineRun.create(RETRAIN, str(tmp_path), "r2", {"proxy": "p.safetensors"})  # no stage 1: no zoo, no compare
    assert reused.skipped(RETRAIN.step("teachers")) and reused.skipped(RETRAIN.step("compare"))
