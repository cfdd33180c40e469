"""`eupe latency`: timed runs in the ExecuTorch runtime, the budget gate, and the adb runner (a fake `adb`
executable on PATH stands in for the phone: a real subprocess, as the step runs it)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eupe.cli import main
from eupe.config import load_config
from eupe.errors import EupeError
from eupe.export.adb import parse_times
from eupe.export.budgets import load_budgets
from eupe.export.latency import run_latency
from eupe.export.lower import lower, lower_methods
from eupe.export.runtime import load_forward, parity, summary

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image model lowered to XNNPACK, [1, 3, 32, 32] in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16)).eval()
    path = tmp_path_factory.mktemp("pte") / "tiny.pte"
    path.write_bytes(lower(model, torch.randn(1, 3, 32, 32)).program)
    return path


@pytest.fixture(scope="module")
def multires_pte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One program, two methods: forward_32 and forward_64 (the same weights, global average pooled)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16)).eval()
    path = tmp_path_factory.mktemp("pte") / "multires.pte"
    programs = {f"forward_{r}": (lambda r=r: torch.export.export(model, (torch.randn(1, 3, r, r),))) for r in (32, 64)}
    path.write_bytes(lower_methods(programs).program)
    return path


def _budgets(path: Path, ms: float) -> str:
    path.write_text(f"device_classes:\n  test-cpu:\n    models:\n      tiny:\n        32: {{budget_ms: {ms}}}\n")
    return str(path)


def _cfg(*extra: str):
    return load_config(None, ["latency.warmup=1", "latency.runs=5", *extra])


def test_gate_passes_above_the_measured_time_and_fails_below(tmp_path: Path, pte: Path):
    out = tmp_path / "ok"
    result = run_latency(_cfg(), str(pte), out, "tiny", budgets=_budgets(tmp_path / "b1.yaml", 1e6), device_class="test-cpu")
    report = json.loads((out / "latency.json").read_text())
    assert report["resolution"] == 32 and report["input_shape"] == [1, 3, 32, 32] and report["runs"] == 5
    assert len(report["runs_ms"]) == 5 and all(t > 0 for t in report["runs_ms"])
    assert min(report["runs_ms"]) <= report["median_ms"] <= report["p90_ms"] <= max(report["runs_ms"])
    assert report["budget_ms"] == 1e6 and report["passed"] is True and result["status"] == "ok"
    assert (out / "latency.png").stat().st_size > 0

    out = tmp_path / "slow"
    with pytest.raises(EupeError, match=r"latency gate: median .* ms over the 1e-06 ms budget of test-cpu/tiny/32px"):
        run_latency(_cfg(), str(pte), out, "tiny", budgets=_budgets(tmp_path / "b2.yaml", 1e-6), device_class="test-cpu")
    report = json.loads((out / "latency.json").read_text())  # written before failing
    assert report["passed"] is False and report["median_ms"] > 1e-6
    assert json.loads((out / "result.json").read_text())["status"] == "failed"


def test_each_method_of_a_multi_resolution_program_is_timed_and_gated(tmp_path: Path, multires_pte: Path):
    budgets = tmp_path / "b.yaml"
    budgets.write_text("device_classes:\n  test-cpu:\n    models:\n      tiny:\n        32: {budget_ms: 1.0e+6}\n"
                       "        64: {budget_ms: 1.0e-6}\n")
    out = tmp_path / "lat"
    with pytest.raises(EupeError, match=r"latency gate: median .* ms over the 1e-06 ms budget of test-cpu/tiny/64px"):
        run_latency(_cfg(), str(multires_pte), out, "tiny", budgets=str(budgets), device_class="test-cpu")
    report = json.loads((out / "latency.json").read_text())
    assert sorted(report["methods"]) == ["forward_32", "forward_64"] and report["passed"] is False
    m32, m64 = report["methods"]["forward_32"], report["methods"]["forward_64"]
    assert m32["input_shape"] == [1, 3, 32, 32] and m32["passed"] is True and m32["budget_ms"] == 1e6
    assert m64["input_shape"] == [1, 3, 64, 64] and m64["passed"] is False and len(m64["runs_ms"]) == 5
    # the top level is the largest size's
    assert report["resolution"] == 64 and report["median_ms"] == m64["median_ms"] and report["runs_ms"] == m64["runs_ms"]

    run_latency(_cfg(), str(multires_pte), tmp_path / "one", "tiny", resolution=32, budgets=str(budgets),
                device_class="test-cpu")  # --resolution: that method only
    report = json.loads((tmp_path / "one" / "latency.json").read_text())
    assert report["resolution"] == 32 and report["passed"] is True and "methods" not in report
    with pytest.raises(EupeError, match=r"--resolution 48: .* takes 32 px inputs \[1, 3, 32, 32\], 64 px inputs"):
        run_latency(_cfg(), str(multires_pte), tmp_path / "bad", "tiny", resolution=48)
    with pytest.raises(EupeError, match=r"--device adb: .* holds methods \['forward_32', 'forward_64'\]"):
        run_latency(_cfg(), str(multires_pte), tmp_path / "adb", "tiny", device="adb")


def test_cli_measures_without_budgets(tmp_path: Path, pte: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "lat"
    code = main(["latency", "--set", "latency.runs=3", "--set", "latency.warmup=0", "--pte", str(pte),
                 "--model", "tiny", "--resolution", "32", "--out", str(out)])
    assert code == 0 and "latency: median" in capsys.readouterr().out
    report = json.loads((out / "latency.json").read_text())
    assert report["budget_ms"] is None and report["passed"] is None and len(report["runs_ms"]) == 3


def test_a_pod_log_of_latency_has_no_native_chatter(tmp_path: Path, pte: Path):
    """ExecuTorch's cpuinfo lines ([cpuinfo_utils.cpp:..], ARM files missing on x86) do not reach the log."""
    import subprocess
    import sys

    proc = subprocess.run([str(Path(sys.executable).parent / "eupe"), "latency", "--set", "latency.runs=2", "--set",
                           "latency.warmup=0", "--pte", str(pte), "--model", "tiny", "--resolution", "32", "--out",
                           str(tmp_path / "lat")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "latency: median" in proc.stdout
    assert "cpuinfo" not in proc.stderr and "KernelPreference" not in proc.stderr and "\r" not in proc.stderr


def test_a_corrupt_program_is_one_line_with_the_runtimes_reason(tmp_path: Path, pte: Path):
    """The runtime's own log line (why it refused the program) becomes the cause in the one-line error, not a
    native line printed before it."""
    import random
    import subprocess
    import sys

    data = bytearray(pte.read_bytes())
    rng = random.Random(0)
    for i in range(64, min(len(data), 2048)):  # the header's magic and sizes stay: the flatbuffer is garbage
        data[i] = rng.randrange(256)
    bad = tmp_path / "corrupt.pte"
    bad.write_bytes(bytes(data))
    proc = subprocess.run([str(Path(sys.executable).parent / "eupe"), "latency", "--pte", str(bad), "--model", "tiny",
                           "--out", str(tmp_path / "lat")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if not ln[:4].isdigit()]  # logging lines start with the date
    assert len(lines) == 1 and lines[0].startswith(f"eupe: error: cannot load {bad} with the ExecuTorch runtime: ")
    assert "(Verification failed" in lines[0] and "[program.cpp" not in proc.stderr
    assert not (tmp_path / "lat").exists()


def test_pte_from_s3(tmp_path: Path, pte: Path, s3_bucket: str):
    import boto3

    boto3.session.Session().client("s3").upload_file(str(pte), s3_bucket, "models/tiny.pte")
    uri = f"s3://{s3_bucket}/models/tiny.pte"
    run_latency(_cfg(), uri, tmp_path / "lat", "tiny")
    report = json.loads((tmp_path / "lat" / "latency.json").read_text())
    assert report["pte"] == uri and report["resolution"] == 32 and len(report["runs_ms"]) == 5


@pytest.mark.parametrize("kwargs, expected", [
    ({"resolution": 64}, r"--resolution 64: .* takes 32 px inputs"),
    ({"device_class": "phone"}, r"no device class 'phone' \(have \['test-cpu'\]\)"),
    ({"model": "vit_b"}, r"device class 'test-cpu' has no model 'vit_b' \(have \['tiny'\]\)"),
], ids=["resolution", "device-class", "model"])
def test_bad_input_fails_before_timing(tmp_path: Path, pte: Path, kwargs: dict, expected: str):
    args = {"model": "tiny", "budgets": _budgets(tmp_path / "b.yaml", 10.0), "device_class": "test-cpu", **kwargs}
    with pytest.raises(EupeError, match=expected):
        run_latency(_cfg(), str(pte), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, expected", [
    ({"resolution": 64}, r"--resolution 64: .* takes 32 px inputs"),
    ({"model": "vit_b"}, r"device class 'test-cpu' has no model 'vit_b'"),
    ({"budget_ms": float("nan")}, r"--budget-ms nan: a latency budget must be a finite number > 0 ms"),
    ({"budget_ms": float("inf")}, r"--budget-ms inf: a latency budget must be a finite number > 0 ms"),
    ({"pte": "text"}, r"not an ExecuTorch program"),
], ids=["resolution", "model", "budget-nan", "budget-inf", "not-a-pte"])
def test_bad_input_into_an_earlier_run_keeps_it_whole(tmp_path: Path, pte: Path, kwargs: dict, expected: str):
    """Inputs are read (the program, its methods, the budget row) before --out is touched: an earlier run's
    result.json stays, and no claim is left behind."""
    out = tmp_path / "out"
    args = {"model": "tiny", "budgets": _budgets(tmp_path / "b.yaml", 1e6), "device_class": "test-cpu"}
    run_latency(_cfg(), str(pte), out, **args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if kwargs.get("pte") == "text":
        (tmp_path / "text.pte").write_text("not a program")
        kwargs = {"pte_uri": str(tmp_path / "text.pte")}
    with pytest.raises(EupeError, match=expected):
        run_latency(_cfg(), **{"pte_uri": str(pte), "out": out, **args, **kwargs})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_budgets_none_measures_without_a_gate(tmp_path: Path, pte: Path):
    run_latency(_cfg(), str(pte), tmp_path / "lat", "tiny", budgets="none")
    report = json.loads((tmp_path / "lat" / "latency.json").read_text())
    assert report["budget_ms"] is None and report["passed"] is None and len(report["runs_ms"]) == 5


def test_repo_budgets_hold_the_paper_reference_row():
    budgets = load_budgets(str(REPO / "configs" / "latency_budgets.yaml"))
    row = budgets.lookup("iphone-15-pro-cpu", "vit_b", 256, "latency_budgets.yaml")
    assert (row.budget_ms, row.gflops) == (216, 47) and budgets.device_classes["iphone-15-pro-cpu"].reference
    assert budgets.lookup("ci-cpu", "demo_student", 64, "latency_budgets.yaml").budget_ms > 0


# --- adb --------------------------------------------------------------------------------------------

FAKE_ADB = """#!/bin/sh
# a stand-in for Android's adb: `devices` lists DEVICES; push/shell succeed; the runner prints its timings
if [ "$1" = "devices" ]; then
  printf 'List of devices attached\\n%s\\n' "$DEVICES"
  exit 0
fi
[ "$1" = "-s" ] && shift 2
echo "$@" >> "$ADB_LOG"
case "$*" in
  *executor_runner*--num_executions=*)
    n=$(echo "$*" | sed 's/.*--num_executions=\\([0-9]*\\).*/\\1/')
    i=1
    [ -n "$ONLY_TOTAL" ] && i=$((n + 1))  # an older runner: no per-iteration lines, only the total
    while [ "$i" -le "$n" ]; do
      echo "I 00:00:00.100 executorch:executor_runner.cpp:600] Iteration $i of $n: $((i * 10)).5 ms" >&2
      i=$((i + 1))
    done
    echo "I 00:00:00.200 executorch:executor_runner.cpp:620] Model executed successfully $n time(s) in $((n * 10)).0 ms." >&2
    ;;
esac
exit 0
"""


@pytest.fixture
def fake_adb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    adb = bindir / "adb"
    adb.write_text(FAKE_ADB)
    adb.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("ADB_LOG", str(tmp_path / "adb.log"))
    return tmp_path / "adb.log"


def _adb_cli(tmp_path: Path, pte: Path, *extra: str) -> int:
    runner = tmp_path / "executor_runner"
    runner.write_bytes(b"\x7fELF")
    return main(["latency", "--device", "adb", "--runner", str(runner), "--set", "latency.warmup=2", "--set",
                 "latency.runs=4", "--pte", str(pte), "--model", "tiny", "--out", str(tmp_path / "out"), *extra])


def test_adb_without_a_device_fails_with_one_line(tmp_path: Path, pte: Path, fake_adb: Path, monkeypatch,
                                                  capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("DEVICES", "")
    assert _adb_cli(tmp_path, pte) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eupe: error: adb: no device attached") and "\n" not in err
    monkeypatch.setenv("DEVICES", "R58M123\tunauthorized")
    assert _adb_cli(tmp_path, pte) == 2
    assert "no device attached (R58M123: unauthorized)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not fake_adb.exists()  # nothing pushed


def test_adb_not_installed(tmp_path: Path, pte: Path, monkeypatch, capsys: pytest.CaptureFixture[str]):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert _adb_cli(tmp_path, pte) == 2
    assert capsys.readouterr().err.strip().startswith("eupe: error: adb not found on PATH")


def test_adb_pushes_runs_and_parses_the_runner_timings(tmp_path: Path, pte: Path, fake_adb: Path, monkeypatch):
    monkeypatch.setenv("DEVICES", "R58M123\tdevice")
    assert _adb_cli(tmp_path, pte) == 0
    report = json.loads((tmp_path / "out" / "latency.json").read_text())
    assert report["device"] == "adb" and report["where"] == "adb R58M123"
    assert report["runs_ms"] == [30.5, 40.5, 50.5, 60.5]  # iterations 3-6: the first 2 are warm-up
    assert report["median_ms"] == 45.5
    calls = fake_adb.read_text().splitlines()
    assert any(c.startswith("push") and c.endswith("/data/local/tmp/eupe/tiny.pte") for c in calls)
    assert any(c.startswith("push") and c.endswith("/data/local/tmp/eupe/executor_runner") for c in calls)
    assert "--model_path=/data/local/tmp/eupe/tiny.pte --num_executions=6" in calls[-1]


def test_adb_runner_printing_only_the_total_leaves_out_the_warmup_runs(tmp_path: Path, pte: Path, fake_adb: Path,
                                                                        monkeypatch):
    monkeypatch.setenv("DEVICES", "R58M123\tdevice")
    monkeypatch.setenv("ONLY_TOTAL", "1")
    assert _adb_cli(tmp_path, pte) == 0
    report = json.loads((tmp_path / "out" / "latency.json").read_text())
    assert report["runs_ms"] == [10.0] * 4 and report["runs"] == 4  # 6 executions in 60 ms, 2 of them warm-up
    assert parse_times("Model executed successfully 6 time(s) in 60.0 ms.", 2) == [10.0] * 4
    with pytest.raises(EupeError, match="executed 2 runs, not more than the 2 warm-up runs"):
        parse_times("Model executed successfully 2 time(s) in 60.0 ms.", 2)


# --- the runtime pieces -----------------------------------------------------------------------------


def test_p90_and_median_of_fixed_run_times():
    s = summary([5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0])
    assert s["median_ms"] == 5.5 and s["p90_ms"] == pytest.approx(9.1)  # 9 + 0.1 * (10 - 9)
    assert s["mean_ms"] == 5.5 and s["min_ms"] == 1.0


def test_parity_is_the_lowest_cosine_over_outputs_and_images():
    ref = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[[1.0, 1.0]], [[3.0, -1.0]]])]
    scaled = [3 * r for r in ref]
    assert parity(ref, scaled) == {"cosine": pytest.approx(1.0), "max_abs": pytest.approx(6.0)}
    orthogonal = [ref[0], torch.tensor([[[1.0, 1.0]], [[1.0, 3.0]]])]  # image 1 of output 1: (3, -1) . (1, 3) = 0
    assert parity(ref, orthogonal)["cosine"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(EupeError, match="parity: output of shape"):
        parity(ref, [ref[0], ref[1][:1]])


def test_unlowerable_op_fails_in_one_line_naming_the_model():
    class Bicubic(nn.Module):  # antialiased bicubic upsampling: no ExecuTorch core op
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=(48, 48), mode="bicubic", antialias=True, align_corners=False)

    with pytest.raises(EupeError) as err:
        lower(Bicubic().eval(), torch.randn(1, 3, 32, 32), name="student_32px_fp32")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("student_32px_fp32: cannot lower to ExecuTorch/XNNPACK: ")
    assert "upsample_bicubic2d_aa" in msg


def test_loaded_program_outlives_its_buffer_and_rejects_a_wrong_input(pte: Path):
    forward = load_forward(pte.read_bytes(), "tiny.pte")
    gc.collect()  # the program must stay alive with its method (executing a freed one crashes the process)
    assert forward.input_shape == (1, 3, 32, 32) and forward(torch.randn(1, 3, 32, 32))[0].shape == (1, 16)
    with pytest.raises(EupeError, match=r"tiny\.pte: ExecuTorch execute failed: input torch\.float32 \[1, 3, 16, 16\]"):
        forward(torch.randn(1, 3, 16, 16))
    with pytest.raises(EupeError, match=r"tiny\.pte: ExecuTorch execute failed: input torch\.float64"):
        forward(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_warmup_forwards_run_untimed_before_the_timed_ones(tmp_path: Path, pte: Path, monkeypatch: pytest.MonkeyPatch):
    """latency.warmup=W, latency.runs=R: W+R forwards of the program, only the last R timed. The W warm-ups
    are made slow (0.2 s each): none of that may show in the recorded runs."""
    import time

    import eupe.export.latency as latency

    warmup, runs, slow_s = 3, 4, 0.2
    calls: list[float] = []

    class SlowFirstCalls:
        def __init__(self, forward):
            self.forward, self.input_shape = forward, forward.input_shape

        def __call__(self, x: torch.Tensor):
            calls.append(time.perf_counter())
            if len(calls) <= warmup:
                time.sleep(slow_s)
            return self.forward(x)

    real = latency.image_methods
    monkeypatch.setattr(latency, "image_methods", lambda *a, **k: {r: SlowFirstCalls(f) for r, f in real(*a, **k).items()})
    run_latency(load_config(None, [f"latency.warmup={warmup}", f"latency.runs={runs}"]), str(pte), tmp_path / "lat", "tiny")
    report = json.loads((tmp_path / "lat" / "latency.json").read_text())
    assert len(calls) == warmup + runs, f"{len(calls)} forwards for {warmup} warm-up + {runs} timed runs"
    assert report["warmup"] == warmup and report["runs"] == runs and len(report["runs_ms"]) == runs
    assert all(0 < t < slow_s * 1e3 / 2 for t in report["runs_ms"]), f"a warm-up was timed: {report['runs_ms']}"
    assert report["median_ms"] < slow_s * 1e3 / 2
