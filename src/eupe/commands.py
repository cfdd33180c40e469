"""Helpers every ``commands.py`` module uses to declare its CLI subcommands."""

from __future__ import annotations

import argparse
import logging

from eupe.config import Config

log = logging.getLogger("eupe")


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
    command line: ``--data``, ``--proxy`` and ``--teachers``. ``--data`` replaces a configured mixture (``data.sources``)
    as a whole, with a warning naming every source it drops; leave ``--data`` out to train on the mixture."""
    extra: list[tuple[str, object]] = []
    if getattr(args, "data", None):
        dropped = _dropped_sources(args)
        if dropped:
            log.warning("--data %s replaces the configured mixture: dropped data.sources %s (leave out --data to train "
                        "on the mixture)", args.data, "; ".join(dropped))
        extra += [("data.root", args.data), ("data.sources", [])]
    if getattr(args, "proxy", None):
        extra.append(("proxy.weights", args.proxy))
    if getattr(args, "teachers", None):  # the zoo `eupe teachers train` wrote: weights of every train: teacher
        from eupe.config import load_config
        from eupe.teachers.zoo import zoo_overrides

        extra += zoo_overrides(load_config(args.config, list(args.overrides)), args.teachers)
    return extra


TEACHERS_HELP = ("folder of `eupe teachers train`: every teacher of the recipe with a train: block loads "
                 "<folder>/<name>.safetensors (its teachers.N.weights)")


def _dropped_sources(args: argparse.Namespace) -> list[str]:
    """The mixture ``--data`` would replace: each configured source as ``uri (weight w, domain d)``."""
    from eupe.config import load_config

    sources = load_config(args.config, list(args.overrides)).data.sources
    return [f"{s.uri} (weight {s.weight:g}{f', domain {s.domain}' if s.domain else ''})" for s in sources]
