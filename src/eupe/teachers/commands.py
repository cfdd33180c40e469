"""``eupe teachers train``: the recipe's ``train:`` teachers, trained on ``--data``, as weight files under ``--out``."""

from __future__ import annotations

import argparse

from eupe.commands import config_args, input_overrides, load


def cmd_train(args: argparse.Namespace) -> None:
    from eupe.teachers.train import run_teachers

    cfg = load(args, input_overrides(args))
    result = run_teachers(cfg, args.out, resume=args.resume)
    m = result["metrics"]
    if not m.get("trained"):
        print(f"teachers: {m.get('note', 'nothing to train')}")
        return
    for name, t in m["teachers"].items():
        shown = ", ".join(f"{k} {t[k]:.4f}" for k in ("heldout_accuracy", "heldout_miou", "heldout_depth_rmse") if k in t)
        print(f"teacher {name} ({t['objective']}, {t['model']} @ {t['img_size']}px): {shown} -> "
              f"{result['artifacts'][name]}")


def register(sub: argparse._SubParsersAction) -> None:
    teachers = sub.add_parser("teachers", help="the teacher zoo: tiny teachers trained here (recipes without real weights)")
    actions = teachers.add_subparsers(dest="teachers_command", required=True, metavar="<action>")
    p = actions.add_parser("train", help="train every teacher of the recipe with a train: block; write <out>/<name>.safetensors")
    config_args(p)
    p.add_argument("--data", help="dataset URI (overrides data.root): image classes, and .mask.png/.depth.png for a dense teacher")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"], metavar="auto",
                   help="reuse the teachers an earlier (killed) run of this step finished with the same inputs")
    p.add_argument("--out", required=True, help="output folder (<teacher>.safetensors, checkpoints/, result.json)")
    p.set_defaults(func=cmd_train)
