"""Metrics against the real servers (DESIGN.md section 4): Debian's ``prometheus-pushgateway`` and
``prometheus`` on free loopback ports, started here. A real ``eupe data scan`` process pushes to the
gateway; a tiny training run serves /metrics while Prometheus scrapes it (and the gateway).

The binaries come from apt (``.ci/run`` installs them); a machine without them skips these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eupe import metrics

pytestmark = pytest.mark.slow

EUPE = Path(sys.executable).parent / "eupe"
PUSHGATEWAY = shutil.which("prometheus-pushgateway")
PROMETHEUS = shutil.which("prometheus")
GROUPING = {"job", "pipeline", "run", "step"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


class Server:
    """A server process on 127.0.0.1:port, its output in a log file."""

    def __init__(self, argv: list[str], port: int, log: Path):
        self.port, self.log, self.url = port, log, f"http://127.0.0.1:{port}"
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"{argv[0]} exited {self.proc.returncode}: {log.read_text()[-2000:]}"
            try:
                get(self.url + "/-/ready")
                return
            except OSError:
                assert time.monotonic() < deadline, f"{argv[0]} not ready: {log.read_text()[-2000:]}"
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_pushgateway(tmp: Path) -> Server:
    if PUSHGATEWAY is None:
        pytest.skip("prometheus-pushgateway not installed (apt-get install prometheus-pushgateway; .ci/run does)")
    port = free_port()
    return Server([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"], port, tmp / "pushgateway.log")


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_pushgateway(tmp_path_factory.mktemp("pushgateway"))
    yield server
    server.stop()


def gateway_samples(gateway: Server, run: str) -> dict:
    """``{(name, labels): value}`` of job eupe and ``run`` on the gateway's /metrics (less the empty
    ``instance`` label the gateway adds to every group)."""
    text = get(gateway.url + "/metrics")
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "instance"))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("job") == "eupe" and s.labels.get("run") == run}


def eupe(*argv: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``eupe ARGV`` as the orchestrator starts it: a process of its own."""
    return subprocess.run([str(EUPE), *map(str, argv)], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def step_env(gateway: str, run: str, step: str = "scan") -> dict[str, str]:
    return {"EUPE_PUSHGATEWAY": gateway, "EUPE_PIPELINE": "eupe_test", "EUPE_RUN_ID": run, "EUPE_STEP": step}


def test_a_step_pushes_its_result_json_to_the_pushgateway(pushgateway, tiny_data, tmp_path):
    run = f"r-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    done = eupe("data", "scan", "--data", tiny_data, "--out", tmp_path / "scan", "--workers", 1,
                env=step_env(f"127.0.0.1:{pushgateway.port}", run))
    assert done.returncode == 0, done.stderr
    assert "metrics:" not in done.stderr  # no warning
    result = json.loads((tmp_path / "scan" / "result.json").read_text())
    got = gateway_samples(pushgateway, run)
    key = (("job", "eupe"), ("pipeline", "eupe_test"), ("run", run), ("step", "scan"))
    m = result["metrics"]
    for name, value in m.items():  # every number of result.json, as it was recorded
        assert got[("eupe_step_metric", tuple(sorted((*key, ("metric", name)))))] == value, name
    assert got[("eupe_read_bytes_total", key)] == m["bytes"]
    assert got[("eupe_step_images_per_second", key)] == m["images_per_s"]
    assert got[("eupe_step_success", key)] == 1.0
    assert got[("eupe_step_up_to_date", key)] == 0.0
    assert 0 < got[("eupe_step_duration_seconds", key)] < time.time() - t0  # from its StepRun to its end
    assert t0 <= got[("eupe_step_last_success_timestamp_seconds", key)] <= time.time()
    ours = {n for n, _ in got} - {"push_time_seconds", "push_failure_time_seconds"}  # those the gateway adds
    assert ours <= metrics.exported_names()
    assert all(set(GROUPING) <= set(dict(labels)) for _, labels in got)

    # the same step failing later in the run keeps the last success's values: a .tar shard without a sample
    # fails the scan in its StepRun's check (exit 2), before --out is touched, so the earlier run's result.json
    # is still there: it is not this run's, and the push is a failure
    (tmp_path / "shards").mkdir()
    tarfile.open(tmp_path / "shards" / "000.tar", "w").close()
    failed = eupe("data", "scan", "--data", tmp_path / "shards", "--out", tmp_path / "scan", "--workers", 1,
                  env=step_env(f"127.0.0.1:{pushgateway.port}", run))
    assert failed.returncode == 2 and "no images in" in failed.stderr, failed.stderr
    after = gateway_samples(pushgateway, run)
    assert after[("eupe_step_success", key)] == 0.0
    assert after[("eupe_step_last_success_timestamp_seconds", key)] == got[("eupe_step_last_success_timestamp_seconds", key)]
    assert after[("eupe_read_bytes_total", key)] == m["bytes"]


def test_a_step_succeeds_with_the_gateway_stopped_and_warns_once(tiny_data, tmp_path):
    gateway = start_pushgateway(tmp_path)
    gateway.stop()
    t0 = time.monotonic()
    done = eupe("data", "scan", "--data", tiny_data, "--out", tmp_path / "scan", "--workers", 1,
                env=step_env(f"127.0.0.1:{gateway.port}", "r-down"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "scan" / "result.json").exists()
    warnings = [line for line in done.stderr.splitlines() if "WARNING eupe.metrics" in line]
    assert len(warnings) == 1 and f"127.0.0.1:{gateway.port}" in warnings[0], done.stderr
    assert time.monotonic() - t0 < 60


# --------------------------------------------------------------------------- Prometheus scrapes training


def scraping(prometheus: Server, job: str) -> bool:
    """Prometheus has tried to scrape ``job``'s target at least once (up or down)."""
    body = json.loads(get(f"{prometheus.url}/api/v1/targets"))
    return any(t["labels"].get("job") == job and not t.get("lastScrape", "0001").startswith("0001")
               for t in body["data"]["activeTargets"])


def query(prometheus: Server, promql: str) -> list[dict]:
    body = json.loads(get(f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
    assert body["status"] == "success", body
    return body["data"]["result"]


def dashboard_queries() -> list[str]:
    """The PromQL of dashboards/eupe-grafana.json's panels, its variables set to All."""
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "dashboards" / "eupe-grafana.json").read_text())
    panels = [q for p in dashboard["panels"] for q in [p, *p.get("panels", [])]]
    return [t["expr"].replace("$pipeline", ".*").replace("$run", ".*").replace("$metric", ".*")
            for p in panels for t in p.get("targets", [])]


def test_prometheus_scrapes_the_training_loss_and_the_pushed_result(pushgateway, tiny_config, tmp_path, monkeypatch):
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; .ci/run does)")
    from eupe.cli import main
    import torch

    train_port, port, run = free_port(), free_port(), f"r-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "200ms", "scrape_timeout": "150ms"},
        "scrape_configs": [
            {"job_name": "eupe-train", "static_configs": [{"targets": [f"127.0.0.1:{train_port}"]}]},
            {"job_name": "pushgateway", "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{pushgateway.port}"]}]},
        ]}))
    prometheus = Server([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{port}"], port, tmp_path / "prometheus.log")
    for k, v in {**step_env(f"127.0.0.1:{pushgateway.port}", run, "train_stage2"), "EUPE_METRICS_PORT": str(train_port),
                 "EUPE_METRICS_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["normalize", "--config", str(tiny_config), "--stage", "2", "--random-proxy", "--out", str(tmp_path / "norm")]) == 0
        deadline = time.monotonic() + 30  # Prometheus scraping the (not yet listening) training port: no race
        while not scraping(prometheus, "eupe-train"):
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.1)
        iters = 120  # ~4 s on one thread: about twenty scrapes
        assert main(["train", "--config", str(tiny_config), "--stage", "2", "--random-proxy", "--norm", str(tmp_path / "norm" / "norm.safetensors"),
                     "--set", f"stage2.iters={iters}", "--set", f"stage2.checkpoint_every={iters}",
                     "--out", str(tmp_path / "stage2")]) == 0
        result = json.loads((tmp_path / "stage2" / "result.json").read_text())
        history = json.loads((tmp_path / "stage2" / "losses.json").read_text())["loss"]
        deadline = time.monotonic() + 30  # the gateway's next scrape
        while not (final := query(prometheus, f'eupe_train_final_loss{{run="{run}"}}')):
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        series = query(prometheus, f'eupe_train_loss{{run="{run}"}}[5m]')
        steps = query(prometheus, f'eupe_train_step{{run="{run}"}}[5m]')
        for expr in dashboard_queries():  # each panel's PromQL parses and runs (query() asserts success)
            query(prometheus, expr)
        dashboard_loss = query(prometheus, f'last_over_time({dashboard_queries()[0]}[5m])')
    finally:
        torch.set_num_threads(threads)
        prometheus.stop()
    assert len(series) == 1 and series[0]["metric"]["stage"] == "2" and series[0]["metric"]["job"] == "eupe-train"
    scraped = [float(v) for _, v in series[0]["values"]]
    done = [int(float(v)) for _, v in steps[0]["values"]]
    assert len(scraped) >= 2, f"{len(scraped)} scrapes during training"
    assert done == sorted(done) and 1 <= done[0] and done[-1] <= iters
    assert set(scraped) <= set(history)  # each scrape saw the loss of a step (exact: both are shortest reprs)
    assert any(r["metric"]["run"] == run for r in dashboard_loss)  # the dashboard's first panel shows this run
    assert final[0]["metric"]["step"] == "train_stage2" and final[0]["metric"]["job"] == "eupe"
    assert float(final[0]["value"][1]) == pytest.approx(result["metrics"]["last_loss"], rel=1e-12)
