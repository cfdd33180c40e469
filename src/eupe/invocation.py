"""The command line a step ran with, and the quick "up to date" check that needs no torch.

``eupe.cli.main`` records the invocation (its arguments and the digest of its ``--config`` file);
``result.json`` keeps it beside the step's fingerprint. Before a step imports anything heavy,
:func:`up_to_date` compares a new invocation with the one recorded under ``--out``: the same arguments,
the same config file, the same code, every fingerprinted input with the same digest and every artifact
still there. The resolved config is a function of exactly these, so the answer is the one the step's own
fingerprint check would give, seconds sooner (a second ``make demo`` is this check per task). Anything
that differs, or is missing, falls through to the step, which then decides with its full fingerprint.
"""

from __future__ import annotations

import logging
from typing import Any

from eupe import storage
from eupe.errors import EupeError

log = logging.getLogger(__name__)

CURRENT: dict[str, Any] | None = None  # the invocation of this process's step (set by eupe.cli.main)


def _config_digest(config: str | None) -> str | None:
    from eupe.fingerprint import digest

    if not config:
        return None
    try:
        return digest(config)
    except EupeError:
        return None  # a missing config: the step itself says so, in its one line


def record(argv: list[str], config: str | None) -> dict[str, Any]:
    """Remember this process's invocation (written into ``result.json`` by the step)."""
    global CURRENT
    CURRENT = {"argv": [str(a) for a in argv], "config_digest": _config_digest(config)}
    return CURRENT


def up_to_date(out: str | None, argv: list[str], config: str | None) -> dict | None:
    """The ``result.json`` under ``out`` when the same invocation already finished ``ok`` with the same
    inputs and code; else ``None``. Never raises: any doubt means "run the step"."""
    from eupe.fingerprint import code_digest, digest

    if not out:
        return None
    uri = f"{str(out).rstrip('/')}/result.json"
    try:
        if not storage.exists(uri):
            return None
        result = storage.read_result(out)
        recorded, fp = result.get("invocation") or {}, result.get("fingerprint") or {}
        if (result.get("status") != "ok" or not fp or recorded.get("argv") != [str(a) for a in argv]
                or recorded.get("config_digest") != _config_digest(config) or fp.get("code") != code_digest()):
            return None
        if any(digest(i["uri"]) != i["digest"] for i in fp.get("inputs", {}).values()):
            return None
        if not all(storage.exists(a) for a in result.get("artifacts", {}).values()):
            return None
    except (EupeError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    log.info("%s: up to date (%s): same command, inputs, config and code as its last run", result.get("step"), out)
    return {**result, "up_to_date": True}
