"""Timing a ``.pte`` on an Android phone: ``adb push`` the model and ExecuTorch's ``executor_runner``,
run it with ``--num_executions``, parse the times it logs.

``executor_runner`` logs ``Iteration i of N: X ms`` per execution (ExecuTorch >= 1.0) and
``Model executed successfully N time(s) in T ms.`` at the end; with only the total (older builds)
each of the N - warmup timed runs is reported as the mean T / N (the warm-up runs cannot be separated
from the total, only left out of the count).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from eupe.errors import EupeError

_ITERATION = re.compile(r"Iteration (\d+) of (\d+): ([0-9.]+) ms")
_TOTAL = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms")
_TIMEOUT_S = 600


def _adb() -> str:
    adb = shutil.which("adb")
    if adb is None:
        raise EupeError("adb not found on PATH: install Android platform-tools, or time on this machine with --device local")
    return adb


def _call(cmd: list[str]) -> str:
    """stdout and stderr together (the runner logs to stderr)."""
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise EupeError(f"`adb {' '.join(cmd[1:])}` did not finish within {_TIMEOUT_S}s") from None
    if done.returncode != 0:
        last = (done.stdout.strip() or "no output").splitlines()[-1]
        raise EupeError(f"`adb {' '.join(cmd[1:])}` failed with exit code {done.returncode}: {last}")
    return done.stdout


def devices(adb: str) -> dict[str, str]:
    """``adb devices``: serial -> state (``device``, ``unauthorized``, ``offline``, ...)."""
    found = {}
    for line in _call([adb, "devices"]).splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
            found[parts[0]] = parts[1]
    return found


def pick_device(adb: str, serial: str | None) -> str:
    attached = devices(adb)
    ready = sorted(s for s, state in attached.items() if state == "device")
    if serial is not None:
        if serial not in ready:
            raise EupeError(f"adb: device {serial!r} is not attached and ready (`adb devices`: {attached or 'none'})")
        return serial
    if not ready:
        others = f" ({', '.join(f'{s}: {st}' for s, st in attached.items())})" if attached else ""
        raise EupeError(f"adb: no device attached{others}: connect a phone with USB debugging on, or use --device local")
    if len(ready) > 1:
        raise EupeError(f"adb: {len(ready)} devices attached ({', '.join(ready)}): pick one with --serial")
    return ready[0]


def parse_times(log: str, warmup: int) -> list[float]:
    """Per-run ms after the first ``warmup`` runs, from ``executor_runner``'s log."""
    per_run = [float(m.group(3)) for m in _ITERATION.finditer(log)]
    if per_run:
        if len(per_run) <= warmup:
            raise EupeError(f"executor_runner logged {len(per_run)} runs, fewer than the {warmup} warm-up runs")
        return per_run[warmup:]
    total = _TOTAL.search(log)
    if total is None:
        tail = " | ".join(log.strip().splitlines()[-2:]) or "no output"
        raise EupeError(f"executor_runner printed no timing (expected 'Model executed successfully ...'): {tail}")
    n, ms = int(total.group(1)), float(total.group(2))
    if n <= warmup:
        raise EupeError(f"executor_runner executed {n} runs, not more than the {warmup} warm-up runs")
    return [ms / n] * (n - warmup)


def time_on_device(pte: Path, runner: str | None, warmup: int, runs: int, serial: str | None = None,
                   workdir: str = "/data/local/tmp/eupe") -> tuple[str, list[float]]:
    """(device serial, per-run ms) of ``pte`` executed by ``executor_runner`` on the attached phone."""
    if not runner:
        raise EupeError("latency.executor_runner: set the path of ExecuTorch's executor_runner built for the phone "
                        "(--runner or --set latency.executor_runner=...)")
    if not Path(runner).is_file():
        raise EupeError(f"latency.executor_runner: file not found: {runner}")
    adb = _adb()
    device = pick_device(adb, serial)
    base = [adb, "-s", device]
    remote_model, remote_runner = f"{workdir}/{pte.name}", f"{workdir}/executor_runner"
    _call([*base, "shell", "mkdir", "-p", workdir])
    _call([*base, "push", str(pte), remote_model])
    _call([*base, "push", str(runner), remote_runner])
    _call([*base, "shell", "chmod", "755", remote_runner])
    log = _call([*base, "shell", remote_runner, f"--model_path={remote_model}", f"--num_executions={warmup + runs}"])
    return device, parse_times(log, warmup)
