"""What the benchmark scripts share on their command lines: counts checked by argparse, and a bad model name,
size or path ending the run in one line (``<script>: error: ...``, exit 2) before anything is timed."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, TypeVar

from eupe.errors import EupeError

T = TypeVar("T")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (argparse prints ``argument --x: ...`` and exits 2 otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive = at_least(1)
non_negative = at_least(0)


def one_line_errors(main: Callable[..., T]) -> Callable[..., T]:
    """``main`` with an :class:`~eupe.errors.EupeError` (an unknown model, a size the model cannot take, a file
    that is not there) printed as one line on stderr, exit code 2, instead of a traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except EupeError as e:
            print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
            sys.exit(2)

    return run
