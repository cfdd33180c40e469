"""``eupe ablation run`` (one seed, every arm) and ``eupe ablation report`` (the seeds as the paper's table)."""

from __future__ import annotations

import argparse

from eupe.commands import config_args, load


def cmd_run(args: argparse.Namespace) -> None:
    from eupe.ablation.run import run_ablation

    cfg = load(args, [("seed", args.seed)])
    result = run_ablation(cfg, args.config, list(args.overrides), args.data, args.teachers, args.seed, args.out)
    m = result["metrics"]
    print(f"ablation seed {args.seed}: " + "; ".join(
        f"{arm} k-NN {m.get(f'{arm}.knn_top1') or 0:.3f} seg {m.get(f'{arm}.seg_miou') or 0:.3f}"
        for arm in ("direct", "proxy", "full", "ta") if f"{arm}.knn_top1" in m) + f" -> {result['artifacts']['ablation']}")


def cmd_report(args: argparse.Namespace) -> None:
    from eupe.ablation.report import report

    report(args.run, args.out)


def register(sub: argparse._SubParsersAction) -> None:
    ablation = sub.add_parser("ablation", help="the paper's ablation: stage 2 only vs 1+2 vs 1+2+3 (and a teaching "
                                               "assistant), per seed, then as a table")
    actions = ablation.add_subparsers(dest="ablation_command", required=True, metavar="<action>")
    p = actions.add_parser("run", help="every arm of ablation.arms for one seed: normalize/train/evaluate steps under --out")
    config_args(p)
    p.add_argument("--data", help="dataset URI (overrides data.root)")
    p.add_argument("--teachers", help="folder of `eupe teachers train` (the zoo the recipe's train: teachers load from)")
    p.add_argument("--seed", type=int, required=True, help="the seed of every step of this run")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"], metavar="auto",
                   help="accepted for the pipeline's retries: every training step of the run always continues from its "
                        "last checkpoint (--resume auto), every finished step is skipped when up to date")
    p.add_argument("--out", required=True, help="output folder (<arm>/<step>/, ablation.json, result.json)")
    p.set_defaults(func=cmd_run, quick_check=False)  # its sub-steps each check their own up-to-dateness
    p = actions.add_parser("report", help="mean +- std over the seeds' runs, as the paper's table and a PNG")
    p.add_argument("--run", action="append", required=True, metavar="DIR",
                   help="output folder of one `eupe ablation run` (repeat per seed)")
    p.add_argument("--out", required=True, help="output folder (ablation.md, ablation.json, ablation.png, result.json)")
    p.set_defaults(func=cmd_report)
