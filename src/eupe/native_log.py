"""Native libraries that log straight to file descriptor 2: keep their lines that matter, drop the chatter.

ExecuTorch's runtime prints five ``[cpuinfo_utils.cpp:NN] ...`` lines (ARM ``midr`` files it cannot find on an
x86 host, a CPU count mismatch in a container) the first time a method creates its thread pool. In a pod log or
an Airflow task log they read like errors. :func:`quiet_native_stderr` runs a block with fd 2 pointed at a
temporary file and writes back every line except those matching the chatter patterns.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

CHATTER = re.compile(rb"^\[cpuinfo_utils\.cpp:\d+\]")
SOURCE = re.compile(rb"^\[[\w.]+:\d+\]\s*")  # "[program.cpp:184] " before a native log line


def native_cause(lines: list[bytes]) -> str:
    """The last native log line, without its ``[file:line]`` prefix ("" when there is none)."""
    text = [SOURCE.sub(b"", line).strip() for line in lines if line.strip()]
    return text[-1].decode(errors="replace")[:200] if text else ""


@contextmanager
def quiet_native_stderr(chatter: re.Pattern[bytes] = CHATTER, into: list[bytes] | None = None) -> Iterator[None]:
    """Within the block, lines a native library writes to fd 2 that match ``chatter`` are dropped; every
    other line still reaches stderr (after the block, in order), or is appended to ``into`` for the caller to
    say (e.g. as the cause in its one-line error). Python's own ``sys.stderr`` is flushed first."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr: nothing native to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True) if not chatter.match(line)]
            if into is not None:
                into.extend(kept)
            elif kept:
                os.write(fd, b"".join(kept))
