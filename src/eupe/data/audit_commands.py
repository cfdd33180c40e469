"""``eupe data scan`` and ``eupe data validate``: the manifest and the data gate."""

from __future__ import annotations

import argparse

from eupe.commands import config_args, load


def cmd_scan(args: argparse.Namespace) -> None:
    from eupe.data.manifest import run_scan

    result = run_scan(load(args), args.data, args.out, workers=args.workers)
    m = result["metrics"]
    print(f"{m['images']} images ({m['undecodable']} undecodable) -> {result['artifacts']['manifest']}")


def cmd_validate(args: argparse.Namespace) -> None:
    from eupe.data.validate import run_validate

    report = run_validate(load(args), args.data, args.out, manifest=args.manifest, workers=args.workers)
    warned = f", warnings: {', '.join(report['warnings'])}" if report["warnings"] else ""
    print(f"data validation passed: {report['images']} images, {report['num_bad_files']} flagged{warned}")


def register(data: argparse._SubParsersAction) -> None:
    p = data.add_parser("scan", help="write manifest.parquet: size, format, hash, decodability and colour stats per image")
    config_args(p)
    p.add_argument("--data", required=True, help="dataset URI (image folder, local or s3://)")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet, result.json)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count)")
    p.set_defaults(func=cmd_scan)

    p = data.add_parser("validate", help="the data gate: a Great Expectations suite over the manifest, "
                                         "validation.json, Data Docs and plots; exit 2 on a broken 'fail' check")
    config_args(p)
    p.add_argument("--data", help="dataset URI to scan (not needed with --manifest)")
    p.add_argument("--manifest", help="manifest.parquet from `eupe data scan` (default: scan --data into --out)")
    p.add_argument("--out", required=True, help="output folder (validation.json, data_docs/, *.png, result.json)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads for the scan (default: CPU count)")
    p.set_defaults(func=cmd_validate)
