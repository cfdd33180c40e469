"""``eupe latency``: time a ``.pte`` (warm-up, then N runs; median and p90) with the ExecuTorch runtime
here or on a phone through adb, and gate the median on a budget from ``configs/latency_budgets.yaml``.
A multi-resolution program (a method per input size, ``forward_256``, ...) has each method timed and
gated on the budget of its size; the top-level figures are those of its largest size.

Writes ``latency.json``, ``latency.png`` (histogram of the runs with the budget line) and
``result.json``; a median over budget fails after they are written.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import struct
from pathlib import Path
from typing import Literal

import torch

from eupe import storage
from eupe.config import Config
from eupe.errors import EupeError, GateFailed
from eupe.export.budgets import Budget, load_budgets
from eupe.export.runtime import image_methods, load_program, summary, threads, time_runs
from eupe.fingerprint import fingerprint
from eupe.step import StepRun

log = logging.getLogger(__name__)

LATENCY_FILE = "latency.json"
# A .pte is a flatbuffer whose file_identifier (bytes 4-8) is "ET" and the schema's two digits (executorch
# schema/program.fbs: "ET12"), optionally followed by an extended header "eh00" <u32 length> <u64 program size>
# <u64 segment base offset> [<u64 segment data size>] (exir/_serialize/_program.py, _ExtendedHeader), little endian.
_PTE_IDENTIFIER = re.compile(rb"ET[0-9]{2}")
_EXTENDED_HEADER = b"eh00"


def check_program(path: Path, uri: str) -> None:
    """Refuse (one line) a file that is not a whole ExecuTorch program before the runtime reads it: on some
    garbage the runtime aborts the process instead of raising."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 8 or not _PTE_IDENTIFIER.fullmatch(head[4:8]):
        raise EupeError(f"--pte {uri}: not an ExecuTorch program (no ET.. identifier at byte 4, found {head[4:8]!r})")
    if head[8:12] == _EXTENDED_HEADER and len(head) >= 32:
        length, program, base = struct.unpack_from("<IQQ", head, 12)
        segments = struct.unpack_from("<Q", head, 32)[0] if length > 24 and len(head) >= 40 else 0  # optional
        need = max(program, base + segments if base else 0)
        if need > size:
            raise EupeError(f"--pte {uri}: truncated ExecuTorch program ({size} bytes, its header says {need})")


def run_latency(cfg: Config, pte_uri: str, out: str | Path, model: str, resolution: int | None = None,
                device: Literal["local", "adb"] = "local", budgets: str | None = None, device_class: str | None = None,
                runner: str | None = None, serial: str | None = None, budget_ms: float | None = None) -> dict:
    """``budget_ms`` gates on that median instead of a row of the budgets file (a domain's own budget)."""
    lat = cfg.latency
    budgets = None if budgets == "none" else budgets or lat.budgets
    device_class = device_class or lat.device_class
    if budget_ms is not None and not (math.isfinite(budget_ms) and budget_ms > 0):
        raise EupeError(f"--budget-ms {budget_ms:g}: a latency budget must be a finite number > 0 ms")

    def check() -> tuple:  # a program or a budget that is not there fails before --out is touched
        pte = storage.local_copy(pte_uri)
        check_program(pte, str(pte_uri))
        methods = image_methods(load_program(pte, str(pte_uri)), str(pte_uri), resolution)  # {R: method}
        if budget_ms is not None:
            budget_of = {r: Budget(budget_ms=budget_ms) for r in methods}
        else:
            budget_of = {r: load_budgets(budgets).lookup(device_class, model, r, budgets) if budgets else None
                         for r in methods}
        return pte, methods, budget_of

    run = StepRun(out, "latency", fingerprint("latency", {"pte": str(pte_uri), "budgets": budgets, "runner": runner}, cfg,
                                              model=model, resolution=resolution, device=device,
                                              device_class=device_class, serial=serial, budget_ms=budget_ms), check=check)
    if run.done:
        return run.done
    pte, methods, budget_of = run.checked
    if budget_ms is not None:
        budgets = f"--budget-ms {budget_ms:g}"

    rows: dict[int, dict] = {}
    for r, forward in methods.items():
        if device == "local":
            where = f"local {platform.machine()}, {threads()} ExecuTorch threads"
            x = torch.randn(forward.input_shape)
            runs = time_runs(lambda: forward(x), lat.warmup, lat.runs)
        elif device == "adb":
            from eupe.export.adb import time_on_device

            if forward.method_name != "forward":
                raise EupeError(f"--device adb: {pte_uri} holds methods {forward.owner.names}; executor_runner runs "
                                "`forward` only: time a single-resolution .pte")
            serial, runs = time_on_device(pte, runner or lat.executor_runner, lat.warmup, lat.runs, serial, lat.adb_workdir)
            where = f"adb {serial}"
        else:
            raise EupeError(f"--device: expected local or adb, got {device!r}")
        stats, budget = summary(runs), budget_of[r]
        rows[r] = {"resolution": r, "input_shape": list(forward.input_shape), "runs": len(runs), "runs_ms": runs, **stats,
                   "budget_ms": budget.budget_ms if budget else None,
                   "passed": None if budget is None else stats["median_ms"] <= budget.budget_ms}
    resolution = max(rows)  # the top-level figures are those of the largest size
    top, budget = rows[resolution], budget_of[resolution]
    passed = None if budget is None else all(row["passed"] for row in rows.values())
    report = {
        "pte": str(pte_uri), "model": model, "resolution": resolution, "input_shape": top["input_shape"],
        "device": device, "where": where, "device_class": device_class,
        "warmup": lat.warmup, **{k: top[k] for k in ("runs", "runs_ms", "median_ms", "p90_ms", "mean_ms", "min_ms")},
        "budget_ms": budget.budget_ms if budget else None, "budgets": budgets, "passed": passed,
    }
    if len(rows) > 1:
        report["methods"] = {methods[r].method_name: row for r, row in rows.items()}
    for r, row in rows.items():
        log.info("%s %d px: median %.3f ms, p90 %.3f ms over %d runs (%s), budget %s", Path(str(pte_uri)).name, r,
                 row["median_ms"], row["p90_ms"], row["runs"], where, "none" if row["budget_ms"] is None else f"{row['budget_ms']:g} ms")
    with run.staging() as tmp:
        storage.write_json(str(tmp / LATENCY_FILE), report)
        from eupe.export.plots import latency_histogram

        latency_histogram(top["runs_ms"], top["median_ms"], report["budget_ms"], tmp / "latency.png",
                          title=f"{model} {resolution}px on {device_class} ({where})")
        metrics = {k: report[k] for k in ("median_ms", "p90_ms", "budget_ms", "passed", "runs")}
    result = run.finish(metrics, {"latency": run.path(LATENCY_FILE), "plot": run.path("latency.png")},
                        status="failed" if passed is False else "ok")
    if passed is False:
        r, row = next((r, row) for r, row in rows.items() if row["passed"] is False)
        raise GateFailed(f"latency gate: median {row['median_ms']:.2f} ms over the {row['budget_ms']:g} ms budget of "
                        f"{device_class}/{model}/{r}px in {budgets} ({run.path(LATENCY_FILE)})")
    return result
