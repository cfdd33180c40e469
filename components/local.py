"""Run a pipeline of the graph here, step after step, each step a ``eupe`` subprocess (or, for tests,
a call of ``eupe.cli.main`` in this process). The Airflow DAGs run the same commands; this runner is
what they are compared with (``benchmarks/``) and what a laptop needs without Airflow.

    python -m components.local [--pipeline eupe_retrain] [--artifact-root artifacts] [--run-id local] \\
        [--param config=configs/demo.yaml --param dataset_uri=data ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from unittest import mock
from pathlib import Path

from components.graph import PIPELINES, Pipeline
from components.plan import items
from components.run import PipelineRun, join
from components.summary import build_summary, format_table


class StepFailed(Exception):
    def __init__(self, step: str, argv: list[str], code: int):
        self.step, self.argv, self.code = step, argv, code
        super().__init__(f"step {step} exited {code}: eupe {' '.join(argv)}")


def eupe_command() -> list[str]:
    exe = Path(sys.executable).parent / "eupe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "eupe.cli"]


def execute(argv: list[str], in_process: bool = False, labels: dict[str, str] | None = None) -> int:
    """``eupe ARGV``; ``labels`` (EUPE_PIPELINE, EUPE_RUN_ID, EUPE_STEP) name the step's metrics, as
    ``components.task`` sets them for the orchestrators."""
    if in_process:
        from eupe.cli import main

        with mock.patch.dict(os.environ, labels or {}):  # set for this step, restored after it
            return main(argv)
    return subprocess.run([*eupe_command(), *argv], stdin=subprocess.DEVNULL,
                          env={**os.environ, **(labels or {})}).returncode


def run_pipeline(pipeline: Pipeline, artifact_root: str, run_id: str, params: dict | None = None,
                 in_process: bool = False) -> PipelineRun:
    """Every step in graph order (fanned-out steps once per element); stops at the first failure."""
    run = PipelineRun.create(pipeline, artifact_root, run_id, params)
    for step in pipeline.steps:
        if run.skipped(step):
            print(f"[{pipeline.name}] {step.name}: skipped ({step.skip_if} is set)", flush=True)
            continue
        for item in items(run, step.expand):
            argv = run.command(step, item)
            label = step.name + (f"[{item['name']}]" if item else "")
            print(f"[{pipeline.name}] {label}: eupe {' '.join(argv)}", flush=True)
            t0 = time.perf_counter()
            code = execute(argv, in_process, {"EUPE_PIPELINE": pipeline.name, "EUPE_RUN_ID": run_id,
                                              "EUPE_STEP": step.name + (f"/{item['name']}" if item else "")})
            if code != 0:
                raise StepFailed(label, argv, code)
            print(f"[{pipeline.name}] {label}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return run


def finish(run: PipelineRun) -> dict:
    """``summary.json`` in the run folder and the table on stdout."""
    summary = build_summary(run)
    from eupe import storage

    storage.write_json(join(run.root, "summary.json"), relative_paths(summary, run.root))
    print(format_table(summary))
    return summary


def relative_paths(summary: dict, root: str) -> dict:
    """``summary.json`` names every file relative to itself (the run folder): the run folder can be copied,
    mounted elsewhere or synced from S3 and still name its own files."""
    from eupe import storage

    base = (root if storage.is_s3(root) else os.path.abspath(root)).rstrip("/") + "/"

    def rel(v):
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, str) and v.startswith(("/", "s3://")) and (v + "/").startswith(base):
            return storage.relative_to(v, root)
        return v

    return {**rel({k: v for k, v in summary.items() if k != "run"}), "run": "."}


def _params(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"components.local: --param {pair!r}: expected NAME=VALUE")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m components.local", description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="eupe_retrain", choices=sorted(PIPELINES))
    p.add_argument("--artifact-root", default="artifacts")
    p.add_argument("--run-id", default="local")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args(argv)
    pipeline = PIPELINES[args.pipeline]
    params = _params(args.param)
    unknown = sorted(set(params) - set(pipeline.params))
    if unknown:
        print(f"components.local: {pipeline.name} has no parameter {unknown} (has {sorted(pipeline.params)})", file=sys.stderr)
        return 2
    try:
        run = run_pipeline(pipeline, args.artifact_root, args.run_id, params)
    except StepFailed as e:
        print(f"components.local: {e}", file=sys.stderr)
        return e.code
    finish(run)
    print(json.dumps({"run": run.root}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
