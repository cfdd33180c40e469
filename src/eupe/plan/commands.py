"""``eupe plan``: memory per GPU of every stage, measured on fake tensors, and the settings that fit."""

from __future__ import annotations

import argparse

from eupe.commands import config_args, load


def cmd_plan(args: argparse.Namespace) -> None:
    from eupe.plan.recommend import parse_memory
    from eupe.plan.run import run_plan

    run_plan(load(args), args.config or "(paper defaults)", args.gpus, parse_memory(args.gpu_memory), nodes=args.nodes,
             headroom=args.headroom, min_micro_batch=args.min_micro_batch, stages=args.stage or None,
             out=None if args.out == "-" else args.out)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="will the recipe fit its GPUs? memory per GPU of each stage's training step "
                                    "(measured on fake tensors) and the micro-batch, sharding and checkpointing "
                                    "that fit")
    config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (FSDP shards over gpus x nodes; default 1)")
    p.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 80GiB, 141GB, 24576MiB")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of the GPU memory left free for the CUDA context, allocator fragmentation and "
                        "kernel workspaces (default 0.1)")
    p.add_argument("--min-micro-batch", type=int, default=8,
                   help="prefer a faster option only if it fits at least this micro-batch (default 8)")
    p.add_argument("--stage", type=int, action="append", choices=[1, 2, 3],
                   help="plan this stage only (repeatable; default all three)")
    p.add_argument("--out", default="build/plan", help="folder for plan.json and plan.png (default build/plan; "
                                                     "'-': print only)")
    p.set_defaults(func=cmd_plan, quick_check=False)
