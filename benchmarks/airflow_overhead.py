"""What Airflow costs: the DAG files' parse time, and the demo pipeline through ``airflow dags test`` against
the same steps run directly by the local runner (``python -m components.local``), in one run.

    .venv/bin/python benchmarks/airflow_overhead.py [--config configs/demo.yaml] [--data data] [--json out.json]

Both runners start from an empty artifact root of their own in a temporary folder and run every step of
``eupe_retrain`` (the same ``eupe`` commands, each a subprocess); then both run again over their finished
runs, where every step is up to date, which leaves the per-task cost of each runner alone. The parse time
is ``DagBag(dags/)`` in a fresh interpreter (as the DAG processor parses), median of ``--parses`` runs,
for the embedded and the cluster mode. Airflow's metadata database is migrated before timing. The goal
(issue: Orchestration on Airflow) is a ratio of at most 1.15 for the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from args import one_line_errors, output_file, positive  # noqa: E402

from eupe.errors import EupeError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PARSE = """
import os, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
assert not bag.import_errors, bag.import_errors
print("RESULT", time.perf_counter() - t0, sum(s.duration.total_seconds() for s in bag.dagbag_stats))
"""


def airflow_env(home: Path, artifacts: Path, mode: str = "embedded") -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW_VAR_EUPE_MODE": mode,
            "AIRFLOW_VAR_EUPE_ARTIFACT_ROOT": str(artifacts), "AIRFLOW_VAR_EUPE_WORKDIR": str(ROOT),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode:  # the log goes with the run's temporary folder: say what failed here
        lines = log.read_text(errors="replace").splitlines()
        cause = next((ln for ln in reversed(lines) if "eupe: error:" in ln), lines[-1] if lines else "no output")
        raise EupeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): {cause.strip()}")
    return wall


def parse_times(tmp: Path, n: int) -> dict[str, dict[str, float]]:
    out = {}
    for mode in ("embedded", "cluster"):
        env = airflow_env(tmp / "home", tmp / "parse", mode)
        rows = [subprocess.run([sys.executable, "-c", PARSE, str(ROOT / "dags")], env=env, capture_output=True,
                               text=True, check=True).stdout.split("RESULT ")[-1].split() for _ in range(n)]
        out[mode] = {"process_s": statistics.median(float(r[0]) for r in rows),
                     "files_s": statistics.median(float(r[1]) for r in rows)}
    return out


@one_line_errors
def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--data", default="data")
    p.add_argument("--parses", type=positive, default=5)
    p.add_argument("--json", type=output_file, help="also write the numbers here")
    args = p.parse_args()
    from eupe.config import load_config

    load_config(ROOT / args.config)  # a bad recipe or data path ends here, not minutes into the first run
    if "://" not in args.data and not (ROOT / args.data).is_dir():  # both runners start in ROOT
        raise EupeError(f"--data {args.data}: no such dataset folder")
    params = {"config": args.config, "dataset_uri": args.data, "model_name": "bench_student"}
    with tempfile.TemporaryDirectory(prefix="eupe-bench-") as d:
        tmp = Path(d)
        log = tmp / "runs.log"
        home = tmp / "home"
        home.mkdir()
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=airflow_env(home, tmp), check=True,
                       capture_output=True)
        parse = parse_times(tmp, args.parses)
        direct_cmd = [sys.executable, "-m", "components.local", "--artifact-root", str(tmp / "direct"),
                      "--run-id", "bench", *[a for k, v in params.items() for a in ("--param", f"{k}={v}")]]
        airflow_cmd = [str(BIN / "airflow"), "dags", "test", "eupe_retrain", "2026-01-05T00:00:00+00:00",
                       "-c", json.dumps({"run_name": "bench", **params})]
        walls: dict[str, list[float]] = {"direct": [], "airflow": []}
        for rnd in ("full", "up to date"):
            for name, cmd, env in (("direct", direct_cmd, dict(os.environ)),
                                   ("airflow", airflow_cmd, airflow_env(home, tmp / "airflow"))):
                print(f"{name}, {rnd}: running ...", flush=True)
                walls[name].append(timed(cmd, env, log))
                print(f"{name}, {rnd}: {walls[name][-1]:.1f} s", flush=True)
    from components.graph import RETRAIN

    tasks = len(RETRAIN.steps)
    result = {"cpu": _cpu(), "parse": parse, "direct_s": walls["direct"], "airflow_s": walls["airflow"],
              "ratio_full": walls["airflow"][0] / walls["direct"][0],
              "ratio_up_to_date": walls["airflow"][1] / walls["direct"][1],
              "airflow_extra_per_step_s": (walls["airflow"][0] - walls["direct"][0]) / tasks, "config": args.config}
    print(f"\nDAG parse (fresh interpreter, median of {args.parses}):")
    print("| mode | process (import + DagBag) | DagBag file parse |\n| --- | --- | --- |")
    for mode, r in parse.items():
        print(f"| {mode} | {r['process_s']:.2f} s | {r['files_s']:.2f} s |")
    print(f"\neupe_retrain on {args.config} ({_cpu()}):")
    print("| run | direct (components.local) | airflow dags test | ratio |\n| --- | --- | --- | --- |")
    for i, rnd in enumerate(("full", "every step up to date")):
        print(f"| {rnd} | {walls['direct'][i]:.1f} s | {walls['airflow'][i]:.1f} s | "
              f"{walls['airflow'][i] / walls['direct'][i]:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def _cpu() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
