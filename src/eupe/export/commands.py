"""``eupe export`` and ``eupe latency``."""

from __future__ import annotations

import argparse

from eupe.commands import config_args, input_overrides, load


def cmd_export(args: argparse.Namespace) -> None:
    from eupe.export.export import run_export

    extra = input_overrides(args)
    if args.weights:
        extra.append((f"{args.encoder}.weights", args.weights))
    if args.resolution is not None:  # 0 or a negative size reaches the config check, not silently the default
        extra.append(("export.resolutions", [args.resolution]))
    result = run_export(load(args, extra), args.out, encoder=args.encoder, dtypes=[args.dtype] if args.dtype else None,
                        only=args.only)
    m = result["metrics"]
    parity = ", ".join(f"{k.removeprefix('parity_cosine_')} {v:.5f}" for k, v in m.items() if k.startswith("parity_cosine_"))
    print(f"export: {m['models']} .pte in {args.out}, lowest parity cosine: {parity}")


def cmd_latency(args: argparse.Namespace) -> None:
    from eupe.export.latency import run_latency

    result = run_latency(load(args), args.pte, args.out, args.model, resolution=args.resolution,
                         device=args.device, budgets=args.budgets, device_class=args.device_class,
                         runner=args.runner, serial=args.serial, budget_ms=args.budget_ms)
    m = result["metrics"]
    budget = f", budget {m['budget_ms']:g} ms: {'pass' if m['passed'] else 'FAIL'}" if m["budget_ms"] else ""
    print(f"latency: median {m['median_ms']:.2f} ms, p90 {m['p90_ms']:.2f} ms over {m['runs']} runs{budget}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ExecuTorch .pte (XNNPACK; fp32 and int8) of the trained encoder, with a parity check")
    config_args(p)
    p.add_argument("--encoder", default="student", choices=["student", "proxy"], help="which model of the recipe")
    p.add_argument("--weights", help="trained encoder (e.g. stage3/encoder.safetensors; overrides <encoder>.weights)")
    p.add_argument("--data", help="images for int8 calibration and the parity check (overrides data.root)")
    p.add_argument("--resolution", type=int, help="export this input size only (overrides export.resolutions)")
    p.add_argument("--dtype", choices=["fp32", "int8"], help="export this precision only (default: fp32, and int8 "
                                                           "with export.int8)")
    p.add_argument("--only", choices=["multires"], help="multires: only the .pte with a method per size of "
                   "export.resolutions (forward_<R>), not the one-size files (a pipeline's extra export element)")
    p.add_argument("--out", required=True, help="output folder (*.pte, export.json, export.png, result.json)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("latency", help="time a .pte here or on a phone (adb) and gate the median on a budget")
    config_args(p)
    p.add_argument("--pte", required=True, help=".pte to time (local path or s3://)")
    p.add_argument("--model", required=True, help="model name of the budget row (e.g. vit_b, demo_student)")
    p.add_argument("--resolution", type=int, help="input size in px (default: the program's; checked against it)")
    p.add_argument("--device", default="local", choices=["local", "adb"], help="this machine, or a phone over adb")
    p.add_argument("--budgets", help="budgets YAML (default latency.budgets; none: measure without a gate)")
    p.add_argument("--device-class", help="row of the budgets file (default latency.device_class)")
    p.add_argument("--budget-ms", type=float, help="gate the median on this budget instead of a row of the budgets file")
    p.add_argument("--runner", help="adb: ExecuTorch executor_runner built for the phone (default latency.executor_runner)")
    p.add_argument("--serial", help="adb: device serial when several are attached")
    p.add_argument("--out", required=True, help="output folder (latency.json, latency.png, result.json)")
    p.set_defaults(func=cmd_latency)
