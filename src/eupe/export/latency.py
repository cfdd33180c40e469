"""``eupe latency``: time a ``.pte`` (warm-up, then N runs; median and p90) with the ExecuTorch runtime
here or on a phone through adb, and gate the median on a budget from ``configs/latency_budgets.yaml``.

Writes ``latency.json``, ``latency.png`` (histogram of the runs with the budget line) and
``result.json``; a median over budget fails after they are written.
"""

from __future__ import annotations

import logging
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
from eupe.export.runtime import load_forward, summary, threads, time_runs
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
    budgets = budgets or lat.budgets
    device_class = device_class or lat.device_class
    run = StepRun(out, "latency", fingerprint("latency", {"pte": str(pte_uri), "budgets": budgets, "runner": runner}, cfg,
                                              model=model, resolution=resolution, device=device,
                                              device_class=device_class, serial=serial, budget_ms=budget_ms))
    if run.done:
        return run.done
    pte = storage.local_copy(pte_uri)
    check_program(pte, str(pte_uri))
    forward = load_forward(pte, str(pte_uri))
    shape = forward.input_shape
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise EupeError(f"{pte_uri}: expected a square image input [1, 3, R, R], the program takes {list(shape)}")
    if resolution is not None and resolution != shape[-1]:
        raise EupeError(f"--resolution {resolution}: {pte_uri} takes {shape[-1]} px inputs {list(shape)}")
    resolution = shape[-1]
    if budget_ms is not None:
        if budget_ms <= 0:
            raise EupeError(f"--budget-ms {budget_ms:g}: a latency budget must be > 0 ms")
        budget, budgets = Budget(budget_ms=budget_ms), f"--budget-ms {budget_ms:g}"
    else:
        budget = load_budgets(budgets).lookup(device_class, model, resolution, budgets) if budgets else None

    if device == "local":
        where = f"local {platform.machine()}, {threads()} ExecuTorch threads"
        x = torch.randn(shape)
        runs = time_runs(lambda: forward(x), lat.warmup, lat.runs)
    elif device == "adb":
        from eupe.export.adb import time_on_device

        serial, runs = time_on_device(pte, runner or lat.executor_runner, lat.warmup, lat.runs, serial, lat.adb_workdir)
        where = f"adb {serial}"
    else:
        raise EupeError(f"--device: expected local or adb, got {device!r}")
    stats = summary(runs)
    median, p90 = stats["median_ms"], stats["p90_ms"]
    passed = None if budget is None else median <= budget.budget_ms
    report = {
        "pte": str(pte_uri), "model": model, "resolution": resolution, "input_shape": list(shape),
        "device": device, "where": where, "device_class": device_class,
        "warmup": lat.warmup, "runs": len(runs), "runs_ms": runs,
        **stats,
        "budget_ms": budget.budget_ms if budget else None, "budgets": budgets, "passed": passed,
    }
    log.info("%s: median %.3f ms, p90 %.3f ms over %d runs (%s), budget %s", Path(str(pte_uri)).name, median, p90,
             len(runs), where, f"{budget.budget_ms:g} ms" if budget else "none")
    with run.staging() as tmp:
        storage.write_json(str(tmp / LATENCY_FILE), report)
        from eupe.export.plots import latency_histogram

        latency_histogram(runs, median, report["budget_ms"], tmp / "latency.png",
                          title=f"{model} {resolution}px on {device_class} ({where})")
        metrics = {k: report[k] for k in ("median_ms", "p90_ms", "budget_ms", "passed", "runs")}
    result = run.finish(metrics, {"latency": run.path(LATENCY_FILE), "plot": run.path("latency.png")},
                        status="failed" if passed is False else "ok")
    if passed is False:
        raise GateFailed(f"latency gate: median {median:.2f} ms over the {budget.budget_ms:g} ms budget of "
                        f"{device_class}/{model}/{resolution}px in {budgets} ({run.path(LATENCY_FILE)})")
    return result
