"""``eupe data ...`` subcommands."""

from __future__ import annotations

import argparse

from eupe.errors import EupeError


def cmd_synth(args: argparse.Namespace) -> None:
    from eupe.data.synth import synthesize

    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    try:
        info = synthesize(args.out, args.num_images, size=size, seed=args.seed, fmt=args.format,
                          num_classes=args.classes, dense=args.dense)
    except (ValueError, FileExistsError) as e:  # bad arguments, or a folder synth did not write
        raise EupeError(f"data synth: {e}") from None
    print(f"{len(info['files'])} images in {args.out}")


def register(data: argparse._SubParsersAction) -> None:
    """Add the actions of ``eupe data``."""
    from eupe.data import audit_commands, versioning

    audit_commands.register(data)  # scan, validate
    versioning.register(data)  # version, pull (DVC)
    p = data.add_parser("synth", help="write a synthetic image-folder dataset (procedural scenes with class labels)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--size", type=int, nargs="+", default=[256], metavar="PX", help="side, or MIN MAX for varied sizes")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="jpg", choices=["jpg", "png"])
    p.set_defaults(quick_check=False)  # its own check reads every file of the dataset (cheap, no torch)
    p.add_argument("--dense", action="store_true",
                   help="also write <index>.mask.png (segmentation) and <index>.depth.png (16-bit mm) next to each image")
    p.set_defaults(func=cmd_synth)
