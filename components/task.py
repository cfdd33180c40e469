"""One step of one pipeline run, resolved and run here: the entry point of every Airflow task.

    python -m components.task --pipeline eupe_retrain --step train_stage2 --run-id R --artifact-root A \\
        --params '{"config": "configs/demo.yaml", ...}' [--item '{"name": "student_64px_fp32", ...}']
    python -m components.task ... --step export --plan [--xcom-file /airflow/xcom/return.json]
    python -m components.task ... --summary

The embedded Airflow task runs it as a subprocess of the project's environment; the cluster task is a
KubernetesPodOperator running it in the project's image, so the command line of a step is resolved
where the step runs (from the upstream steps' ``result.json`` under the artifact root). It exits with
the ``eupe`` exit code: 0 done, 1 crash (retried), 2 bad input, 3 a failed gate (neither retried), and
:data:`SKIPPED` when the run's parameters make the step unnecessary (stage 1 with a reused proxy).
``--plan`` prints the elements a fanned-out step is mapped over (``components.plan``) as JSON; with
``--xcom-file`` they (or, for a step, the metrics of its ``result.json``) are written there too: the task's
return value (the pod operator's XCom sidecar reads ``/airflow/xcom/return.json``).
Imports nothing of Airflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from components.graph import PIPELINES
from components.run import PipelineRun, UnresolvedReference

SKIPPED = 99  # the step is not needed in this run (``Step.skip_if``); the pod operator skips on it
BAD_INPUT = 2


def parse_json(text: str | None, what: str) -> dict | None:
    if text in (None, ""):
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"components.task: {what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"components.task: {what} must be a JSON object, got {type(value).__name__}")
    return value


def run_eupe(argv: list[str]) -> int:
    """``eupe`` in this process (the same code as the console script, one interpreter start less)."""
    from eupe.cli import main

    code = main(argv)
    return int(code or 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m components.task", description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, choices=sorted(PIPELINES))
    p.add_argument("--step", help="the step to run (or to plan, with --plan)")
    p.add_argument("--run-id", required=True, help="folder of the run under <artifact root>/runs/<pipeline>/")
    p.add_argument("--artifact-root", required=True, help="local folder or s3:// prefix")
    p.add_argument("--params", default="{}", help="JSON object: the pipeline parameters of this run")
    p.add_argument("--item", help="JSON object: the element of a fanned-out step this task runs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the elements --step is mapped over, as JSON")
    mode.add_argument("--summary", action="store_true", help="write summary.json of the run and print its table")
    p.add_argument("--xcom-file", help="write the planned elements (--plan) or the step's metrics there as JSON")
    args = p.parse_args(argv)

    pipeline = PIPELINES[args.pipeline]
    params = parse_json(args.params, "--params") or {}
    unknown = sorted(set(params) - set(pipeline.params))
    if unknown:
        print(f"components.task: {pipeline.name} has no parameter {unknown} (has {sorted(pipeline.params)})",
              file=sys.stderr)
        return BAD_INPUT
    run = PipelineRun.create(pipeline, args.artifact_root, args.run_id, params)

    if args.summary:
        from components.local import finish

        finish(run)
        return 0
    if not args.step:
        p.error("--step is required (unless --summary)")
    try:
        step = pipeline.step(args.step)
    except KeyError as e:
        print(f"components.task: {e.args[0]}", file=sys.stderr)
        return BAD_INPUT

    try:
        if args.plan:
            from components.plan import items

            elements = items(run, step.expand) if step.expand else []
            if args.xcom_file:
                write_xcom(args.xcom_file, elements)
            print(json.dumps(elements))
            return 0
        if run.skipped(step):
            print(f"[{pipeline.name}] {step.name}: skipped ({step.skip_if})", flush=True)
            return SKIPPED
        command = run.command(step, parse_json(args.item, "--item"))
    except UnresolvedReference as e:  # an upstream output is missing: this run cannot go on
        print(f"eupe: error: {step.name}: {e}", file=sys.stderr)
        return BAD_INPUT
    except Exception as e:  # a planner's config that does not load: the eupe error's own line and code
        from eupe.errors import EupeError

        if not isinstance(e, EupeError):
            raise
        print(f"eupe: error: {step.name}: {e}", file=sys.stderr)
        return e.exit_code
    print(f"[{pipeline.name}] {step.name}: eupe {' '.join(command)}", flush=True)
    item = parse_json(args.item, "--item") or {}  # the step's Pushgateway group (eupe.metrics), as its folder is named
    os.environ.update(EUPE_PIPELINE=pipeline.name, EUPE_RUN_ID=args.run_id,
                      EUPE_STEP=f"{step.name}/{item['name']}" if item.get("name") else step.name)
    code = run_eupe(command)
    if code == 0 and args.xcom_file:  # what the step measured, for the orchestrator (a dataset version's hash)
        metrics = run.result(step.name, parse_json(args.item, "--item")).get("metrics", {})
        write_xcom(args.xcom_file, metrics)
    return code


def write_xcom(path: str, value) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value))


if __name__ == "__main__":
    sys.exit(main())
