"""The one way every step finishes (DESIGN.md, "A step").

    run = StepRun(out, "export", fingerprint(...))   # checks --out, before any compute
    if run.done:                                      # same inputs, config and code as the last ok run
        return run.done
    ... compute ...
    with run.staging() as tmp:                        # a private folder; published when the block succeeds
        write files into tmp
    return run.finish(metrics, artifacts)             # result.json, written last

* ``--out`` is refused up front when it is a file, or a folder holding another step's ``result.json``;
* a stale ``result.json`` is dropped before the step computes, so a crash never leaves an "ok" behind;
* publishing moves only the names the step staged (local: ``os.replace`` per name; S3: one upload per
  file) and never deletes anything else under ``--out``; ``result.json`` is the completion marker;
* the staging folder of a killed run (``.<step>.staging-*``) is removed by the next run of the step.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eupe import metrics, storage
from eupe.errors import EupeError
from eupe.results import RESULT_FILE, write_result

log = logging.getLogger(__name__)


def _uri(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/{name}"


class StepRun:
    """One run of ``step`` into ``out`` (local folder or ``s3://`` prefix). ``main=False`` (the other ranks
    of a torchrun job) only reads: the up-to-date check, never a write."""

    def __init__(self, out: str | Path, step: str, fingerprint: dict | None = None, main: bool = True):
        self.out, self.step, self.fingerprint, self.main = str(out), step, fingerprint, main
        self.metrics = metrics.begin(step, self.out) if main else None  # pushed at the end, a failure too (eupe.metrics)
        self.local = not storage.is_s3(self.out)
        if self.local and Path(self.out).exists() and not Path(self.out).is_dir():
            raise EupeError(f"--out {self.out}: is a file, not a folder")
        previous = self._previous()
        if previous is not None and previous.get("step") != step:
            raise EupeError(f"--out {self.out} holds the output of step {previous.get('step')!r}, not {step!r}: "
                            "each step writes to a folder of its own")
        self.done = self._up_to_date(previous)
        if self.done is not None and self.metrics is not None:
            self.metrics.finish(self.done, up_to_date=True)
        if self.done is None and main:
            self._start()

    def _previous(self) -> dict | None:
        uri = _uri(self.out, RESULT_FILE)
        if not storage.exists(uri):
            return None
        try:
            data = storage.read_json(uri)
        except EupeError:
            return None  # unreadable: stale, replaced by this run
        return data if isinstance(data, dict) else None

    def _up_to_date(self, previous: dict | None) -> dict | None:
        if self.fingerprint is None or previous is None or previous.get("status") != "ok":
            return None
        if previous.get("fingerprint") != self.fingerprint:
            return None
        if not all(storage.exists(a) for a in previous.get("artifacts", {}).values()):
            return None
        log.info("%s: up to date (%s): same inputs, config and code as its last run", self.step, self.out)
        return {**previous, "up_to_date": True}

    def restart(self) -> None:
        """Compute again although the last run looked up to date (the step found its outputs incomplete)."""
        self.done = None
        if self.main:
            self._start()

    def _start(self) -> None:
        storage.delete(_uri(self.out, RESULT_FILE))
        if self.local and Path(self.out).is_dir():
            for leftover in Path(self.out).glob(f".{self.step}.staging-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private local folder; its entries replace the same names under ``out`` when the block succeeds."""
        name = f".{self.step}.staging-{os.getpid()}-{secrets.token_hex(4)}"
        if self.local:
            tmp = Path(self.out) / name
            tmp.mkdir(parents=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=name))
        try:
            yield tmp
            storage.publish_files(tmp, self.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def path(self, name: str) -> str:
        """Where a staged file ends up (for the artifact paths in ``result.json``)."""
        return _uri(self.out, name)

    def finish(self, metrics: dict[str, Any], artifacts: dict[str, Any], status: str = "ok") -> dict:
        """``result.json``, last: what the step measured, where its outputs are, and its fingerprint."""
        result = write_result(self.out, self.step, metrics, artifacts, status=status, fingerprint=self.fingerprint)
        if self.metrics is not None:
            self.metrics.finish(result)
        return result
