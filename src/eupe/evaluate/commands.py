"""``eupe evaluate``: frozen-encoder metrics, their plots and the quality gate."""

from __future__ import annotations

import argparse

from eupe.commands import TEACHERS_HELP, config_args, input_overrides, load


def cmd_evaluate(args: argparse.Namespace) -> None:
    from eupe.evaluate.run import run_evaluate

    cfg = load(args, input_overrides(args))
    if args.compare:
        from eupe.errors import EupeError
        from eupe.evaluate.compare import COLUMNS, run_compare

        given = [f for f in ("checkpoint", "norm", "baseline") if getattr(args, f)]
        if given or args.encoder != "student":
            raise EupeError(f"--compare measures every encoder of the recipe against a random student: "
                            f"--{given[0] if given else 'encoder'} does not apply")
        rows = run_compare(cfg, args.out, args.weights)["metrics"]["rows"]
        for label, row in rows.items():
            print(f"{label}: " + ", ".join(f"{k} {row[k]:.4f}" for k in COLUMNS if row.get(k) is not None))
        return
    result = run_evaluate(cfg, args.encoder, args.out, weights=args.weights, checkpoint=args.checkpoint,
                          norm=args.norm, baseline=args.baseline)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result["metrics"].items() if v is not None}
    print(f"evaluate {args.encoder}: {shown} -> {result['artifacts']['eval']}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="k-NN, seg/depth probes, keypoint PCK and fidelity of a frozen encoder; quality gate")
    config_args(p)
    p.add_argument("--encoder", default="student", help="student, proxy or a teacher's name (default: student)")
    p.add_argument("--weights", help="encoder weights URI (default: the model's configured weights, or --checkpoint)")
    p.add_argument("--checkpoint", help="training checkpoint (model.safetensors with adapters): enables fidelity")
    p.add_argument("--norm", help="norm.safetensors of the checkpoint's stage (with --checkpoint)")
    p.add_argument("--proxy", help="proxy weights: the target of stages 2 and 3 for fidelity (overrides proxy.weights)")
    p.add_argument("--teachers", help=TEACHERS_HELP)
    p.add_argument("--data", help="dataset URI (overrides data.root); masks/depth as <name>.mask.png / <name>.depth.png")
    p.add_argument("--baseline", help="eval.json of the model in production: fail when a metric regresses")
    p.add_argument("--compare", action="store_true",
                   help="every teacher (--teachers), the proxy (--proxy), the student (--weights) and a randomly "
                        "initialised student side by side: compare.json")
    p.add_argument("--out", required=True, help="output folder (eval.json, PNG plots, result.json)")
    p.set_defaults(func=cmd_evaluate)
