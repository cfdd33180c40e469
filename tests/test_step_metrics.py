"""eupe.metrics: what each step's result.json becomes on the Pushgateway, when it is pushed, and the
training /metrics endpoint. (Named test_step_metrics.py: tests/evaluate/test_metrics.py holds the name
test_metrics.) The real Pushgateway and Prometheus: tests/integration/test_prometheus.py."""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eupe import metrics
from eupe.results import write_result
from eupe.step import StepRun


def as_dict(samples) -> dict:
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples}


def exposed(samples) -> dict:
    """The samples as the Pushgateway receives them, parsed back."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(metrics._Samples(samples))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


TRAIN = {"step": "train-stage2", "status": "ok", "metrics": {
    "first_loss": 2.5, "last_loss": 0.75, "first_step_loss": 2.6, "last_step_loss": 0.7, "loss_per_target": {"a": {}},
    "steps": 12, "images_per_s": 40.0, "wall_s": 3.0, "skipped_images": 2, "world_size": 1}}


def test_a_training_stage_pushes_its_losses_rate_and_skipped_images():
    got = as_dict(metrics.step_samples("train-stage2", TRAIN, 3.5, True, now=1000.0))
    assert got[("eupe_step_duration_seconds", ())] == 3.5
    assert got[("eupe_step_success", ())] == 1.0
    assert got[("eupe_step_last_success_timestamp_seconds", ())] == 1000.0
    assert got[("eupe_step_up_to_date", ())] == 0.0
    assert got[("eupe_train_first_loss", (("stage", "2"),))] == 2.5
    assert got[("eupe_train_final_loss", (("stage", "2"),))] == 0.75
    assert got[("eupe_step_images_per_second", ())] == 40.0
    assert got[("eupe_skipped_images_total", ())] == 2
    assert got[("eupe_step_metric", (("metric", "steps"),))] == 12
    assert ("eupe_step_metric", (("metric", "loss_per_target"),)) not in got  # numbers only


def test_evaluate_pushes_each_numeric_metric_labelled_and_its_gate():
    result = {"status": "failed", "metrics": {"knn_top1": 0.5, "seg_miou": None, "depth_rmse": 0.25, "fidelity": 1,
                                              "gate_passed": False, "gate_regressed": ["knn_top1"]}}
    got = as_dict(metrics.step_samples("evaluate", result, 1.0, False))
    assert {k[1][0][1]: v for k, v in got.items() if k[0] == "eupe_eval_metric"} == \
        {"knn_top1": 0.5, "depth_rmse": 0.25, "fidelity": 1}
    assert got[("eupe_gate_passed", (("gate", "quality"),))] == 0.0
    assert got[("eupe_step_success", ())] == 0.0
    # a failure leaves the last success's timestamp on the gateway (pushed with POST, never overwritten)
    assert not any(k[0] in ("eupe_step_last_success_timestamp_seconds", "eupe_step_up_to_date") for k in got)
    assert not any(k[0] == "eupe_step_metric" for k in got)


def test_export_pushes_parity_per_dtype_including_the_max_abs_of_export_json():
    result = {"status": "ok", "metrics": {"models": 2, "passed": True, "parity_cosine_fp32": 0.9999, "bytes_fp32": 4096,
                                          "parity_cosine_int8": 0.99, "bytes_int8": 1024}}
    models = {"a_32px_fp32": {"dtype": "fp32", "parity_max_abs": 1e-5}, "a_64px_fp32": {"dtype": "fp32", "parity_max_abs": 3e-5},
              "a_32px_int8": {"dtype": "int8", "parity_max_abs": 0.25}}
    got = as_dict(metrics.step_samples("export", result, 1.0, True, export_models=models))
    assert got[("eupe_export_parity_cosine", (("dtype", "fp32"),))] == 0.9999
    assert got[("eupe_export_parity_cosine", (("dtype", "int8"),))] == 0.99
    assert got[("eupe_export_program_size_bytes", (("dtype", "int8"),))] == 1024
    assert got[("eupe_export_parity_max_abs", (("dtype", "fp32"),))] == 3e-5
    assert got[("eupe_export_parity_max_abs", (("dtype", "int8"),))] == 0.25
    assert got[("eupe_gate_passed", (("gate", "export"),))] == 1.0


def test_latency_is_pushed_in_seconds_and_a_missing_budget_is_left_out():
    result = {"status": "ok", "metrics": {"median_ms": 12.5, "p90_ms": 20.0, "budget_ms": 30.0, "passed": True, "runs": 10}}
    got = as_dict(metrics.step_samples("latency", result, 1.0, True))
    assert got[("eupe_latency_median_seconds", ())] == pytest.approx(0.0125)
    assert got[("eupe_latency_p90_seconds", ())] == pytest.approx(0.02)
    assert got[("eupe_latency_budget_seconds", ())] == pytest.approx(0.03)
    assert got[("eupe_gate_passed", (("gate", "latency"),))] == 1.0
    result["metrics"].update(budget_ms=None, passed=None)
    got = as_dict(metrics.step_samples("latency", result, 1.0, True))
    assert not any(k[0] in ("eupe_latency_budget_seconds", "eupe_gate_passed") for k in got)


def test_data_steps_push_bytes_read_rate_and_the_data_gate():
    scan = {"status": "ok", "metrics": {"images": 16, "decodable": 15, "undecodable": 1, "bytes": 33675, "images_per_s": 31.8}}
    got = as_dict(metrics.step_samples("data-scan", scan, 1.0, True))
    assert got[("eupe_read_bytes_total", ())] == 33675
    assert got[("eupe_step_images_per_second", ())] == 31.8
    assert got[("eupe_step_metric", (("metric", "undecodable"),))] == 1
    validate = {"status": "ok", "metrics": {"passed": True, "images": 16, "num_bad_files": 0, "failed": []}}
    got = as_dict(metrics.step_samples("data-validate", validate, 1.0, True))
    assert got[("eupe_gate_passed", (("gate", "data"),))] == 1.0
    assert not any(k[0] == "eupe_read_bytes_total" for k in got)  # validate does not report its bytes


def test_a_step_that_died_pushes_its_duration_and_a_failure_only():
    got = as_dict(metrics.step_samples("evaluate", None, 7.0, False))
    assert got == {("eupe_step_duration_seconds", ()): 7.0, ("eupe_step_success", ()): 0.0}


@pytest.mark.parametrize("step, result", [("train-stage2", TRAIN), ("evaluate", {"status": "ok", "metrics": {"knn_top1": 0.5, "gate_passed": True}}),
                                          ("latency", {"status": "ok", "metrics": {"median_ms": 1.0, "p90_ms": 2.0, "budget_ms": 3.0, "passed": False}}),
                                          ("export", {"status": "ok", "metrics": {"parity_cosine_fp32": 1.0, "bytes_fp32": 10}})])
def test_every_sample_is_declared_and_survives_the_exposition_format(step, result):
    samples = metrics.step_samples(step, result, 1.0, True, export_models={"m": {"dtype": "fp32", "parity_max_abs": 0.5}})
    assert {name for name, _, _ in samples} <= metrics.exported_names()
    for name, labels, _ in samples:
        assert set(labels) == set(metrics.STEP_METRICS[name][2]), name
        assert name.startswith("eupe_") and (name.endswith("_total") == (metrics.STEP_METRICS[name][0] == "counter"))
    assert exposed(samples) == as_dict(samples)  # counters keep their _total and get no _created series


# --------------------------------------------------------------------------- when StepRun pushes


@pytest.fixture
def pushes(monkeypatch):
    """Record pushes instead of sending them; no pending step of one test is left for the next."""
    sent = []
    monkeypatch.setattr(metrics, "push", lambda gateway, grouping, samples, replace=True: sent.append(
        {"gateway": gateway, "grouping": grouping, "samples": as_dict(samples), "replace": replace}))
    for var in ("EUPE_PUSHGATEWAY", "EUPE_PIPELINE", "EUPE_RUN_ID", "EUPE_STEP"):
        monkeypatch.delenv(var, raising=False)
    yield sent
    metrics._open.clear()


def test_no_gateway_configured_nothing_is_pushed(pushes, tmp_path):
    run = StepRun(tmp_path / "out", "data-scan", {"x": 1})
    assert run.metrics is None
    run.finish({"images": 1}, {})
    metrics._flush_open()
    assert pushes == [] and metrics._open == []


def test_finish_pushes_with_the_orchestrators_grouping_key(pushes, tmp_path, monkeypatch):
    monkeypatch.setenv("EUPE_PUSHGATEWAY", "127.0.0.1:9")
    monkeypatch.setenv("EUPE_PIPELINE", "eupe_retrain")
    monkeypatch.setenv("EUPE_RUN_ID", "r1")
    monkeypatch.setenv("EUPE_STEP", "scan")
    run = StepRun(tmp_path / "out", "data-scan", {"x": 1})
    time.sleep(0.01)
    result = run.finish({"images": 16, "bytes": 100}, {})
    assert len(pushes) == 1
    p = pushes[0]
    assert (p["gateway"], p["grouping"], p["replace"]) == ("127.0.0.1:9", {"pipeline": "eupe_retrain", "run": "r1", "step": "scan"}, True)
    assert p["samples"][("eupe_step_success", ())] == 1.0 and p["samples"][("eupe_read_bytes_total", ())] == 100
    assert p["samples"][("eupe_step_duration_seconds", ())] >= 0.01
    assert result["status"] == "ok"
    metrics._flush_open()
    assert len(pushes) == 1  # finished: nothing left for the exit

    again = StepRun(tmp_path / "out", "data-scan", {"x": 1})  # same fingerprint: the up-to-date no-op pushes too
    assert again.done and pushes[1]["samples"][("eupe_step_up_to_date", ())] == 1.0
    assert pushes[1]["samples"][("eupe_step_metric", (("metric", "images"),))] == 16
    metrics._flush_open()
    assert len(pushes) == 2  # its result.json is the one pushed


def test_the_clis_quick_up_to_date_check_pushes_the_recorded_result(pushes, tmp_path, monkeypatch):
    result = StepRun(tmp_path / "out", "data-scan", {"x": 1}).finish({"images": 16}, {})
    monkeypatch.setenv("EUPE_PUSHGATEWAY", "127.0.0.1:9")
    metrics.up_to_date(str(tmp_path / "out"), result)
    metrics._flush_open()
    assert len(pushes) == 1 and pushes[0]["grouping"]["step"] == "data-scan" and pushes[0]["replace"]
    assert pushes[0]["samples"][("eupe_step_up_to_date", ())] == 1.0
    assert pushes[0]["samples"][("eupe_step_metric", (("metric", "images"),))] == 16


def test_without_the_orchestrator_the_group_is_the_step_name(pushes, tmp_path, monkeypatch):
    monkeypatch.setenv("EUPE_PUSHGATEWAY", "http://127.0.0.1:9")
    StepRun(tmp_path / "out", "evaluate").finish({"knn_top1": 0.5}, {})
    assert pushes[0]["grouping"] == {"pipeline": "", "run": "", "step": "evaluate"}


def test_other_ranks_never_push(pushes, tmp_path, monkeypatch):
    monkeypatch.setenv("EUPE_PUSHGATEWAY", "127.0.0.1:9")
    assert StepRun(tmp_path / "out", "train-stage1", {"x": 1}, main=False).metrics is None
    metrics._flush_open()
    assert pushes == []


def test_a_step_that_raised_is_pushed_as_a_failure_at_exit(pushes, tmp_path, monkeypatch):
    monkeypatch.setenv("EUPE_PUSHGATEWAY", "127.0.0.1:9")

    def step():
        run = StepRun(tmp_path / "out", "evaluate", {"x": 1})
        with run.staging():
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        step()
    metrics._flush_open()  # what atexit runs when the `eupe` process ends
    assert len(pushes) == 1
    assert pushes[0]["replace"] is False  # POST: the last success's values and timestamp stay
    assert pushes[0]["samples"].keys() == {("eupe_step_duration_seconds", ()), ("eupe_step_success", ())}
    assert pushes[0]["samples"][("eupe_step_success", ())] == 0.0


def test_a_step_writing_result_json_itself_is_pushed_from_it_at_exit(pushes, tmp_path, monkeypatch):
    """promote: ``StepRun(out, STEP)`` for the checks, then ``write_result`` directly."""
    monkeypatch.setenv("EUPE_PUSHGATEWAY", "127.0.0.1:9")
    StepRun(tmp_path / "ok", "promote")
    write_result(tmp_path / "ok", "promote", {"version": 3, "published": True}, {})
    StepRun(tmp_path / "failed", "promote")
    write_result(tmp_path / "failed", "promote", {"published": False}, {}, status="failed")
    metrics._flush_open()
    ok, failed = pushes
    assert ok["replace"] and ok["samples"][("eupe_step_metric", (("metric", "version"),))] == 3
    assert not failed["replace"] and failed["samples"][("eupe_step_success", ())] == 0.0


def test_a_gate_failure_is_pushed_with_its_metrics_as_a_failure(pushes, tmp_path, monkeypatch):
    monkeypatch.setenv("EUPE_PUSHGATEWAY", "127.0.0.1:9")
    StepRun(tmp_path / "out", "latency", {"x": 1}).finish({"median_ms": 50.0, "budget_ms": 30.0, "passed": False}, {}, status="failed")
    p = pushes[0]
    assert not p["replace"] and p["samples"][("eupe_step_success", ())] == 0.0
    assert p["samples"][("eupe_gate_passed", (("gate", "latency"),))] == 0.0
    assert p["samples"][("eupe_latency_median_seconds", ())] == 0.05


# --------------------------------------------------------------------------- a gateway that is down


def test_an_unreachable_gateway_warns_once_and_a_silent_one_times_out(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_warned", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there once the socket is closed
    samples = metrics.step_samples("evaluate", None, 1.0, False)
    grouping = {"pipeline": "", "run": "", "step": "evaluate"}
    with caplog.at_level(logging.WARNING, logger="eupe.metrics"), socket.socket() as silent:
        assert metrics.push(f"127.0.0.1:{closed}", grouping, samples) is False
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts the connection, never answers
        t0 = time.monotonic()
        assert metrics.push(f"127.0.0.1:{silent.getsockname()[1]}", grouping, samples) is False
        waited = time.monotonic() - t0
    assert metrics.PUSH_TIMEOUT_S - 0.1 <= waited < metrics.PUSH_TIMEOUT_S + 2
    assert len([r for r in caplog.records if r.name == "eupe.metrics"]) == 1


# --------------------------------------------------------------------------- training /metrics


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_training_serves_its_gauges_on_the_metrics_port(monkeypatch, caplog):
    monkeypatch.delenv("EUPE_METRICS_PORT", raising=False)
    assert isinstance(metrics.serve_training(2, 10, 8), metrics._Off)
    monkeypatch.setenv("EUPE_METRICS_PORT", "0")  # any free port
    monkeypatch.setenv("EUPE_METRICS_ADDR", "127.0.0.1")
    monkeypatch.setenv("EUPE_RUN_ID", "r7")
    monkeypatch.delenv("EUPE_PIPELINE", raising=False)
    assert isinstance(metrics.serve_training(2, 10, 8, main=False), metrics._Off)
    live = metrics.serve_training(2, 10, 8)
    port = live.port
    try:
        live.update(4, 0.5, 16.0, 1e-3)
        got = scrape(port)
        labels = (("pipeline", ""), ("run", "r7"), ("stage", "2"))
        assert got[("eupe_train_step", labels)] == 4
        assert got[("eupe_train_loss", labels)] == 0.5
        assert got[("eupe_train_images_per_second", labels)] == 16.0
        assert got[("eupe_train_eta_seconds", labels)] == pytest.approx(6 * 8 / 16.0)
        assert got[("eupe_train_learning_rate", labels)] == 1e-3
        assert {k[0] for k in got} == set(metrics.TRAINING_METRICS)
        monkeypatch.setenv("EUPE_METRICS_PORT", str(port))  # taken: a warning, training goes on
        with caplog.at_level(logging.WARNING, logger="eupe.metrics"):
            assert isinstance(metrics.serve_training(2, 10, 8), metrics._Off)
        assert "cannot serve /metrics" in caplog.text
    finally:
        live.close()
    with pytest.raises(OSError):
        scrape(port)


def test_the_orchestrators_entry_point_names_the_group(monkeypatch, tmp_path):
    """components.task sets EUPE_PIPELINE, EUPE_RUN_ID and EUPE_STEP (a fanned-out element: step/item, as
    its folder) before the step runs in its process."""
    from components import task

    seen = []
    for var in ("EUPE_PIPELINE", "EUPE_RUN_ID", "EUPE_STEP"):
        monkeypatch.setenv(var, "")  # restored (unset) after the test
    monkeypatch.setattr(task, "run_eupe", lambda argv: seen.append({v: os.environ[v] for v in
                                                                     ("EUPE_PIPELINE", "EUPE_RUN_ID", "EUPE_STEP")}) or 1)
    base = ["--pipeline", "eupe_retrain", "--run-id", "r9", "--artifact-root", str(tmp_path), "--step", "validate"]
    assert task.main(base) == 1
    assert task.main([*base, "--item", '{"name": "student_64px_fp32"}']) == 1
    assert seen == [{"EUPE_PIPELINE": "eupe_retrain", "EUPE_RUN_ID": "r9", "EUPE_STEP": "validate"},
                    {"EUPE_PIPELINE": "eupe_retrain", "EUPE_RUN_ID": "r9", "EUPE_STEP": "validate/student_64px_fp32"}]
