"""What the benchmark scripts share on their command lines: counts checked by argparse, and a bad model name,
size or path ending the run in one line (``<script>: error: ...``, exit 2) before anything is timed."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
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


def non_negative_number(text: str) -> float:
    """An argparse ``type``: a finite number >= 0 (seconds, milliseconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0")
    return value


def _writable_folder(folder: Path, text: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)  # where the output goes anyway
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {e.strerror or e}") from None


def output_file(text: str) -> Path:
    """An argparse ``type``: a file the run can write at its end (its folder is created and probed now, so that
    a bad path ends the run before anything is timed, not after)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    _writable_folder(path.parent, text)
    return path


def output_folder(text: str) -> Path:
    """An argparse ``type``: a folder the run writes into (created and probed now)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    _writable_folder(path, text)
    return path


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
