"""``eupe promote`` and ``eupe lineage``: the model registry at the end of every run."""

from __future__ import annotations

import argparse
import json
import os

from eupe.commands import config_args

RUN_ID_ENV = ("EUPE_RUN_ID", "AIRFLOW_CTX_DAG_RUN_ID")  # the orchestrator's run id when --run-id is not given


def cmd_promote(args: argparse.Namespace) -> None:
    from eupe.registry.promote import promote, read_inputs

    inputs = read_inputs(args.encoder, args.eval, args.export, args.latency, args.data_version,
                         args.checkpoint_version, args.config, args.overrides)
    run_id = args.run_id or next((os.environ[v] for v in RUN_ID_ENV if os.environ.get(v)), None)
    result = promote(inputs, args.name, args.registry, args.out, run_id=run_id)
    m, a = result["metrics"], result["artifacts"]
    if m.get("already_production"):
        print(f"promote: {m['name']} version {m['version']} is already production with these inputs ({a['version']})")
    else:
        previous = f" (was version {m['previous']})" if m.get("previous") else " (first version)"
        print(f"promote: {m['name']} version {m['version']} -> {a['version']}; production.json points to it{previous}")


def cmd_lineage(args: argparse.Namespace) -> None:
    from eupe.registry.lineage import format_lineage, read_lineage

    record = read_lineage(args.uri)
    print(json.dumps(record, indent=2) if args.json else "\n".join(format_lineage(record)))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="publish a model whose quality, export and latency gates passed; "
                                       "then move production.json")
    p.add_argument("--name", required=True, help="model name: published under <registry>/models/<name>/")
    p.add_argument("--registry", required=True, help="artifact root (local folder or s3://bucket/prefix)")
    p.add_argument("--encoder", required=True, help="trained encoder (e.g. stage3/encoder.safetensors)")
    p.add_argument("--eval", required=True, help="output folder of `eupe evaluate` (eval.json, result.json)")
    p.add_argument("--export", action="append", required=True, metavar="DIR",
                   help="output folder of `eupe export` (*.pte, export.json, result.json); repeatable: one per variant")
    p.add_argument("--latency", action="append", required=True, metavar="DIR",
                   help="output folder of `eupe latency` with a budget (repeatable: one per .pte and device)")
    p.add_argument("--data-version", metavar="DIR", help="--out folder of `eupe data version` of the training data")
    p.add_argument("--checkpoint-version", action="append", default=[], metavar="DIR",
                   help="--out folder of `eupe data version` of a checkpoint directory (repeatable)")
    config_args(p)
    p.add_argument("--run-id", help=f"pipeline run id for the lineage (default: ${' or $'.join(RUN_ID_ENV)})")
    p.add_argument("--out", required=True, help="output folder (result.json)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("lineage", help="print where a published model version came from")
    p.add_argument("uri", help="a version folder (<registry>/models/<name>/<version>) or a production.json")
    p.add_argument("--json", action="store_true", help="print lineage.json as it is")
    p.set_defaults(func=cmd_lineage)
