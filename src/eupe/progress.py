"""Progress of long work, fit for a terminal and for a pod's log alike.

On a terminal: a tqdm bar. Anywhere else (a pod log, an Airflow task log, a file): no carriage-return bar but
one plain line every ``EUPE_PROGRESS_INTERVAL`` seconds (default 30) and one at the end, each with the count,
rate, ETA and the latest postfix (loss, ...), e.g.
``stage2: 120/390000 step (0.0%) 3.1 step/s eta 34h56m loss=0.7141``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("eupe.progress")


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("EUPE_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LogProgress:
    """The tqdm subset the steps use (iterate, ``update``, ``set_postfix``, ``close``), as periodic log lines."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, disable: bool = False, every: float | None = None):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start = initial
        self.every = interval() if every is None else every
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.n - self.start) / elapsed
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.1f}%)")
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_eta((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return " ".join(parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if not self.closed and not self.disable:
            log.info("%s", self.line())
        self.closed = True


def progress(iterable: Iterable | None = None, **kw: Any):
    """A tqdm bar on a terminal (stderr is a TTY), :class:`LogProgress` lines anywhere else."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, mininterval=2, **kw)
    return LogProgress(iterable, **kw)
