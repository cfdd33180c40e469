"""Helpers every ``commands.py`` module uses to declare its CLI subcommands."""

from __future__ import annotations

import argparse

from eupe.config import Config


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (default: the paper's numbers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stage2.lr=1e-4 (repeatable)")


def load(args: argparse.Namespace, extra: list | None = None) -> Config:
    """The recipe of ``--config`` with ``--set`` overrides, then ``extra`` overrides from input flags."""
    from eupe.config import load_config

    return load_config(args.config, [*args.overrides, *(extra or [])])


def input_overrides(args: argparse.Namespace) -> list[tuple[str, object]]:
    """Input URIs given as flags become literal config overrides, so a step's inputs are explicit on its
    command line: ``--data`` (replacing a configured mixture) and ``--proxy``."""
    extra: list[tuple[str, object]] = []
    if getattr(args, "data", None):
        extra += [("data.root", args.data), ("data.sources", [])]
    if getattr(args, "proxy", None):
        extra.append(("proxy.weights", args.proxy))
    return extra
