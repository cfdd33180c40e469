"""``eupe <step>``: one subcommand per pipeline step. Inputs are URIs, outputs go under ``--out``.

Exit codes: 0 done (``result.json`` written), 2 bad input (one line on stderr naming it), 3 a failed quality,
parity or latency gate (outputs written, one line naming the reason), 143 preempted (SIGTERM: training saved a
checkpoint; a retry with ``--resume`` continues), 1 a crash.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from eupe.commands import TEACHERS_HELP, config_args, input_overrides, load
from eupe.data import commands as data_commands
from eupe import __version__, invocation
from eupe.ablation import commands as ablation_commands
from eupe.errors import EupeError, Preempted
from eupe.evaluate import commands as evaluate_commands
from eupe.export import commands as export_commands
from eupe.plan import commands as plan_commands
from eupe.registry import commands as registry_commands
from eupe.teachers import commands as teachers_commands

# Modules with a ``register(subparsers)`` that adds top-level steps (kept out of this file so that
# each step's flags live next to its code).
STEP_COMMANDS: list = [evaluate_commands, export_commands, registry_commands, plan_commands, teachers_commands,
                      ablation_commands]


RANDOM_PROXY_HELP = ("stages 2-3 without proxy weights (--proxy, proxy.weights): distil a randomly initialised proxy "
                     "(tests; never what you want)")


def cmd_normalize(args: argparse.Namespace) -> None:
    from eupe.distill.normalize import run_normalize

    cfg = load(args, input_overrides(args))
    result = run_normalize(cfg, args.stage, args.out, manifest=args.manifest, random_proxy=args.random_proxy)
    print(result["artifacts"]["stats"])


def cmd_train(args: argparse.Namespace) -> None:
    from eupe.distill.trainer import train

    cfg = load(args, input_overrides(args))
    allow = [f.strip() for item in args.allow_config_change for f in item.split(",") if f.strip()]
    result = train(cfg, args.stage, args.out, norm=args.norm, init=args.init, resume=args.resume,
                   random_proxy=args.random_proxy, from_scratch=args.from_scratch, allow_changes=allow)
    if result:
        m = result["metrics"]
        print(f"stage{args.stage}: loss {m['first_loss']:.4f} -> {m['last_loss']:.4f}, {m['images_per_s']:.1f} img/s, "
              f"checkpoint {result['artifacts'].get('checkpoint')}")


def cmd_config(args: argparse.Namespace) -> None:
    from eupe.config import dump_config

    print(dump_config(load(args)), end="")


def one_line(e: EupeError) -> str:
    """The message itself, also when a DataLoader worker raised it: torch re-raises it with the worker's
    traceback appended, whose last line is ``module.ClassName: message``."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])
    return text.splitlines()[0] if text else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eupe", description="EUPE: distil vision teachers into one small universal encoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"eupe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<step>")

    data = sub.add_parser("data", help="dataset steps").add_subparsers(dest="data_command", required=True, metavar="<action>")
    data_commands.register(data)

    p = sub.add_parser("normalize", help="frozen per-target feature mean/std for a stage")
    config_args(p)
    p.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    p.add_argument("--data", help="dataset URI (overrides data.root)")
    p.add_argument("--proxy", help="proxy weights for stages 2 and 3 (overrides proxy.weights)")
    p.add_argument("--teachers", help=TEACHERS_HELP)
    p.add_argument("--manifest", help="manifest.parquet of --data (eupe data scan): draw the batch stratified by "
                                      "domain and class, without undecodable files and outliers")
    p.add_argument("--random-proxy", action="store_true", help=RANDOM_PROXY_HELP)
    p.add_argument("--out", required=True, help="output folder (norm.safetensors, result.json)")
    p.set_defaults(func=cmd_normalize)

    p = sub.add_parser("train", help="run one distillation stage")
    config_args(p)
    p.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    p.add_argument("--data", help="dataset URI (overrides data.root)")
    p.add_argument("--norm", required=True, help="norm.safetensors from `eupe normalize` for this stage")
    p.add_argument("--proxy", help="proxy weights for stages 2 and 3 (overrides proxy.weights)")
    p.add_argument("--teachers", help=TEACHERS_HELP)
    p.add_argument("--init", help="checkpoint to start from (required by stage 3: a stage-2 checkpoint's model.safetensors)")
    p.add_argument("--random-proxy", action="store_true", help=RANDOM_PROXY_HELP)
    p.add_argument("--from-scratch", action="store_true",
                   help="stage 3 without --init: train a randomly initialised student (tests; never what you want)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"], metavar="auto",
                   help="continue from the last checkpoint under --out (refused when another config or other "
                        "inputs wrote it); `--resume auto`: continue when the same ones did, else start over")
    p.add_argument("--allow-config-change", action="append", default=[], metavar="FIELD[,FIELD]",
                   help="with --resume: config fields (or input names) that may differ from the checkpoint's run, "
                        "e.g. stage2.iters to extend a run; globs allowed (repeatable)")
    p.add_argument("--out", required=True, help="output folder (checkpoints/, encoder.safetensors, result.json)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config")
    config_args(p)
    p.set_defaults(func=cmd_config)

    for module in STEP_COMMANDS:  # evaluation, export, latency, ...: each module declares its own
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "matplotlib", "dvc", "botocore", "urllib3"):  # their INFO is internal chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's deprecation notice, at every export
    argv = sys.argv[1:] if argv is None else list(argv)
    out, config = getattr(args, "out", None), getattr(args, "config", None)
    invocation.record(argv, config)
    done = getattr(args, "quick_check", True) and isinstance(out, (str, Path)) and invocation.up_to_date(
        str(out), argv, config)
    if done:
        from eupe import metrics

        metrics.up_to_date(str(out), done)  # the no-op's success, with EUPE_PUSHGATEWAY
        name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        print(f"eupe {name}: up to date ({out}): nothing to do", flush=True)
        return 0  # before the step imports torch: a rerun of an unchanged pipeline takes seconds
    try:
        args.func(args)
    except Preempted as e:
        print(f"eupe: preempted: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except EupeError as e:
        print(f"eupe: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    finally:
        invocation.CURRENT = None  # a later step called in this process records its own
    return 0


if __name__ == "__main__":
    sys.exit(main())
