"""The one way every step finishes (DESIGN.md, "A step").

    run = StepRun(out, "export", fingerprint(...))   # checks --out, before any compute
    if run.done:                                      # same inputs, config and code as the last ok run
        return run.done
    ... compute ...
    with run.staging() as tmp:                        # a private folder; published when the block succeeds
        write files into tmp
    return run.finish(metrics, artifacts)             # result.json, written last

* ``--out`` is refused up front (one line, before any compute) when it is a file (or lies below one), when
  it holds another step's ``result.json`` or claim, and when it is not empty but no run of this step wrote
  it: a step only ever writes into a new or empty folder, or into its own earlier output;
* a step that computes first claims its ``--out`` (``.eupe-step``, naming the step), so its partial output
  (a killed training's checkpoints) stays its own; ``result.json`` replaces the claim at the end;
* a stale ``result.json`` is dropped before the step computes, so a crash never leaves an "ok" behind;
* publishing moves only the names the step staged (local: ``os.replace`` per name; S3: one upload per
  file) and never deletes anything else under ``--out``; ``result.json`` is the completion marker;
* the temporary files and folders of a killed run (its staging folder, a half-written checkpoint, a file
  half-written by :mod:`eupe.storage`) are removed by the next run of the step.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eupe import metrics, storage
from eupe.errors import EupeError
from eupe.results import RESULT_FILE, write_result

log = logging.getLogger(__name__)


def _uri(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/{name}"


CLAIM_FILE = ".eupe-step"  # {"step": ...}: the step writing into this --out, until its result.json


def release_claim(out: str | Path) -> None:
    """A local ``--out`` holding nothing but this run's claim (a bad input found after the claim, e.g. a shard that
    turns out unreadable while streaming) is removed: a refused step writes nothing."""
    if storage.is_s3(str(out)):
        return
    path = Path(out)
    if path.is_dir() and [p.name for p in path.iterdir()] == [CLAIM_FILE]:
        (path / CLAIM_FILE).unlink()
        path.rmdir()


class StepRun:
    """One run of ``step`` into ``out`` (local folder or ``s3://`` prefix). ``main=False`` (the other ranks
    of a torchrun job) only reads: the checks and the up-to-date check, never a write."""

    def __init__(self, out: str | Path, step: str, fingerprint: dict | None = None, main: bool = True,
                 check: Callable[[], Any] | None = None):
        """``check`` reads the inputs that can only be checked by opening them (a model's weights, a program's
        methods) when the step is not up to date, before ``out`` is touched: its bad input loses nothing there.
        What it returns (what it opened, for the work to use) is ``self.checked``; None when up to date."""
        self.out, self.step, self.fingerprint, self.main = str(out), step, fingerprint, main
        self.metrics = metrics.begin(step, self.out) if main else None  # pushed at the end, a failure too (eupe.metrics)
        self.local, self.claimed, self.checked = not storage.is_s3(self.out), None, None
        self._check_place()
        previous = self._previous()
        if self.metrics is not None:
            self.metrics.earlier = previous  # not this run's result, should it fail before it writes one
        self._check_owner(previous)
        self.done = self._up_to_date(previous)
        if self.done is not None and self.metrics is not None:
            self.metrics.finish(self.done, up_to_date=True)
        if self.done is None and check is not None:
            self.checked = check()
        if self.done is None and main:
            self._start()
        if main:
            inputs = (fingerprint or {}).get("inputs", {})
            log.info("%s: %s -> %s%s", step, ", ".join(f"{k}={v['uri']}" for k, v in inputs.items()) or "no inputs",
                     self.out, " (up to date)" if self.done is not None else "")

    def _check_place(self) -> None:
        """A folder (or a place for one), not a file; on S3 a prefix, not an object."""
        if not self.local:
            if storage.is_object(self.out):  # split_s3 inside: a malformed key is refused too
                raise EupeError(f"--out {self.out}: is an object, not a prefix")
            return
        path = Path(self.out)
        if path.exists() and not path.is_dir():
            raise EupeError(f"--out {self.out}: is a file, not a folder")
        above = next((p for p in path.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise EupeError(f"--out {self.out}: {above} is a file, not a folder")

    def _previous(self) -> dict | None:
        uri = _uri(self.out, RESULT_FILE)
        if not storage.exists(uri):
            return None
        try:
            data = storage.read_result(self.out)
        except EupeError:
            return None  # unreadable: not this step's (its result.json is written atomically)
        return data if isinstance(data, dict) else None

    def _claimant(self) -> str | None:
        uri = _uri(self.out, CLAIM_FILE)
        try:
            data = storage.read_json(uri) if storage.exists(uri) else None
        except EupeError:
            return None
        return data.get("step") if isinstance(data, dict) and isinstance(data.get("step"), str) else None

    def _check_owner(self, previous: dict | None) -> None:
        """This step's own earlier output (its result.json or its claim), or a new or empty folder."""
        if previous is not None:
            if previous.get("step") != self.step:
                raise EupeError(f"--out {self.out} holds the output of step {previous.get('step')!r}, not "
                                f"{self.step!r}: each step writes to a folder of its own")
            return
        self.claimed = self._claimant()
        if self.claimed is not None:
            if self.claimed != self.step:
                raise EupeError(f"--out {self.out} is being written by step {self.claimed!r} ({CLAIM_FILE}), not "
                                f"{self.step!r}: each step writes to a folder of its own")
            return
        found = storage.entries(self.out, limit=4)
        if found:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise EupeError(f"--out {self.out} is not empty ({shown}) and no run of step {self.step!r} wrote it: "
                            "give a new or empty folder (a step never writes among files it does not own)")

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
        """An existing ``out``: claim it, drop a stale result.json, remove what a killed run of this step left
        half-written. A new one is claimed by the step's first write there (nothing is written before: a bad
        input found after this point leaves no folder behind)."""
        if not storage.exists(self.out):
            storage.on_first_write(self.out, self.claim)
            return
        self.claim()
        storage.delete(_uri(self.out, RESULT_FILE))
        if self.local:
            storage.remove_leftovers(self.out)

    def claim(self) -> None:
        """Mark ``out`` as this step's (``.eupe-step``) until its result.json: a killed run's partial output
        (a training's checkpoints) stays its own. Called before anything else is written under ``out``."""
        if self.claimed != self.step and self.main:
            self.claimed = self.step
            storage.write_json(_uri(self.out, CLAIM_FILE), {"step": self.step})

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private local folder; its entries replace the same names under ``out`` when the block succeeds."""
        name = "." + storage.temp_name(self.step, "staging")
        if self.local:
            self.claim()
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
        storage.delete(_uri(self.out, CLAIM_FILE))  # result.json names the step from now on
        if self.metrics is not None:
            self.metrics.finish(result)
        return result
