"""The benchmark scripts refuse bad input in one line, exit 2, before anything is built or timed (benchmarks/args.py)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _args_module():
    spec = importlib.util.spec_from_file_location("bench_args", BENCH / "args.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_at_least_takes_integers_from_the_bound_up():
    m = _args_module()
    assert m.positive("1") == 1 and m.non_negative("0") == 0 and m.at_least(3)("12") == 12
    for parse, text, says in [(m.positive, "0", "0: must be at least 1"), (m.non_negative, "-1", "-1: must be at least 0"),
                              (m.positive, "2.5", "'2.5' is not an integer"), (m.positive, "", "'' is not an integer")]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{says}$".replace(".", r"\.")):
            parse(text)


# Each case fails before any model is built or timed (the scripts take minutes when they run): a few seconds each.
CASES = [
    ("export_latency.py", ["--rounds", "0"], "argument --rounds: 0: must be at least 1"),
    ("export_latency.py", ["--models", "vit_x"], "--models: unknown timm model 'vit_x'"),
    ("export_latency.py", ["--models", "vit_s", "--sizes", "250"], "--sizes: 250 px is not a multiple of vit_s's patch size 16"),
    ("train_throughput.py", ["--threads", "0"], "argument --threads: 0: must be at least 1"),
    ("train_throughput.py", ["--teacher", "nope", "--steps", "1"], "proxy.model: unknown timm model 'nope'"),
    ("data_throughput.py", ["--sources", "nope"], "argument --sources: invalid choice: 'nope'"),
    ("gpu_step.py", ["--device", "cpu", "--steps", "0"], "argument --steps: 0: must be at least 1"),
    ("airflow_overhead.py", ["--parses", "0"], "argument --parses: 0: must be at least 1"),
    ("faults.py", ["--kills", "0"], "argument --kills: 0: must be at least 1"),
    # an output the run could not write at its end ends it at the start
    ("train_throughput.py", ["--json", "."], "argument --json: . is a folder, not a file"),
    ("train_throughput.py", ["--wait-idle", "nan"], "argument --wait-idle: nan: must be a finite number >= 0"),
    ("export_latency.py", ["--png", "/proc/eupe.png"], "argument --png: cannot write /proc/eupe.png"),
    ("data_throughput.py", ["--json", "/proc/eupe.json"], "argument --json: cannot write /proc/eupe.json"),
    ("gpu_step.py", ["--json", "/proc/eupe.json"], "argument --json: cannot write /proc/eupe.json"),
    ("faults.py", ["--out", "/proc/eupe"], "argument --out: cannot write /proc/eupe"),
    ("airflow_overhead.py", ["--config", "no_such.yaml"], "config file not found"),
    ("airflow_overhead.py", ["--data", "no_such_data"], "--data no_such_data: no such dataset folder"),
]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is not None,
                    reason="onnxruntime installed (the bench extra): the benchmark would run")
def test_export_latency_without_the_bench_extra_says_how_to_install_it(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "export_latency.py"), "--models", "vit_t", "--sizes", "32"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("export_latency.py: error: onnxruntime") and "-e '.[bench]'" in last, last


@pytest.mark.parametrize(("script", "argv", "says"), CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(script, argv, says, tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(BENCH / script), *argv, "--json", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and says in last, r.stderr[-2000:]
    assert not out.exists()  # nothing measured, nothing written
