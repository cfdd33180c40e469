"""Prometheus metrics (DESIGN.md section 4: Prometheus scraping, a Pushgateway for the batch steps).

* **Every step** pushes to a Pushgateway at its end when ``EUPE_PUSHGATEWAY`` (``host:port`` or a URL) is
  set, through :class:`eupe.step.StepRun`: job ``eupe``, grouping key ``pipeline``, ``run``, ``step`` from
  ``EUPE_PIPELINE``, ``EUPE_RUN_ID``, ``EUPE_STEP`` (set by ``components.task``; else "", "" and the step's
  own name). A success replaces the group (PUT); a failure (a failed gate, an exception, a process that
  ends before its step finished) pushes with POST, so the group keeps the last success's values and
  timestamp next to ``eupe_step_success 0``. A push that fails logs ONE warning and never fails the step;
  without ``EUPE_PUSHGATEWAY`` nothing is pushed and no socket is opened.
* **Training** serves live gauges on ``EUPE_METRICS_PORT`` (address ``EUPE_METRICS_ADDR``, default all
  interfaces) from the main rank while it runs: :func:`serve_training`.

Names follow the Prometheus conventions: ``eupe_`` prefix, base units (seconds, bytes), ``_total`` on
counters. :func:`exported_names` lists them all (the Grafana dashboard is checked against it).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from typing import Any

log = logging.getLogger(__name__)

JOB = "eupe"
PUSH_TIMEOUT_S = 2.0
Sample = tuple[str, dict[str, str], float]

# What a step pushes: name -> (type, help, labels besides the grouping key's job, pipeline, run, step).
STEP_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "eupe_step_duration_seconds": ("gauge", "Wall time of the step's last attempt, from its StepRun to its end", ()),
    "eupe_step_success": ("gauge", "1 when the step's last attempt succeeded, 0 when it failed", ()),
    "eupe_step_last_success_timestamp_seconds": ("gauge", "Unix time of the step's last success", ()),
    "eupe_step_up_to_date": ("gauge", "1 when the last success was the no-op of an up-to-date result.json", ()),
    "eupe_step_metric": ("gauge", "Each numeric value of result.json's metrics, units as in its key", ("metric",)),
    "eupe_step_images_per_second": ("gauge", "Images the step went through per second (training, data scan)", ()),
    "eupe_skipped_images_total": ("counter", "Undecodable images a training stage replaced", ()),
    "eupe_read_bytes_total": ("counter", "Bytes of image files the step read (data scan)", ()),
    "eupe_gate_passed": ("gauge", "1 when the step's gate passed, 0 when it failed", ("gate",)),
    "eupe_train_first_loss": ("gauge", "Mean loss over the first 20% of a stage's steps", ("stage",)),
    "eupe_train_final_loss": ("gauge", "Mean loss over the last 20% of a stage's steps", ("stage",)),
    "eupe_eval_metric": ("gauge", "Each numeric metric of the evaluation (knn_top1, seg_miou, ...)", ("metric",)),
    "eupe_export_parity_cosine": ("gauge", "Lowest cosine of an exported program's outputs to the model's", ("dtype",)),
    "eupe_export_parity_max_abs": ("gauge", "Largest absolute difference of an exported program's outputs", ("dtype",)),
    "eupe_export_program_size_bytes": ("gauge", "Size of the largest exported .pte program", ("dtype",)),
    "eupe_latency_median_seconds": ("gauge", "Median latency of one forward pass of the .pte", ()),
    "eupe_latency_p90_seconds": ("gauge", "90th percentile latency of one forward pass of the .pte", ()),
    "eupe_latency_budget_seconds": ("gauge", "Latency budget the median is gated on", ()),
}
# What a training stage serves on /metrics while it runs (labels: pipeline, run, stage).
TRAINING_LABELS = ("pipeline", "run", "stage")
TRAINING_METRICS: dict[str, str] = {
    "eupe_train_step": "Optimizer steps done in this stage",
    "eupe_train_loss": "Loss of the last optimizer step",
    "eupe_train_images_per_second": "Images per second since this run of the stage started",
    "eupe_train_eta_seconds": "Estimated seconds until the stage's last step",
    "eupe_train_learning_rate": "Learning rate of the last optimizer step",
}
GATES = {"evaluate": ("gate_passed", "quality"), "export": ("passed", "export"), "latency": ("passed", "latency"),
         "data-validate": ("passed", "data")}


def exported_names() -> set[str]:
    """Every series name this module exposes, pushed or served."""
    return set(STEP_METRICS) | set(TRAINING_METRICS)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def step_samples(step: str, result: dict | None, duration_s: float, ok: bool, up_to_date: bool = False,
                 now: float | None = None, export_models: dict | None = None) -> list[Sample]:
    """The samples one step pushes: ``step`` is the name StepRun knows (``train-stage2``, ``evaluate``),
    ``result`` its result.json (None when it died before writing one), ``export_models`` the ``models`` of
    export.json (the max abs parity is recorded there only)."""
    out: list[Sample] = [("eupe_step_duration_seconds", {}, duration_s), ("eupe_step_success", {}, float(ok))]
    if ok:
        out += [("eupe_step_last_success_timestamp_seconds", {}, time.time() if now is None else now),
                ("eupe_step_up_to_date", {}, float(up_to_date))]
    m = (result or {}).get("metrics") or {}

    def add(name: str, key: str, labels: dict | None = None, scale: float = 1.0) -> None:
        if _number(m.get(key)) is not None:
            out.append((name, labels or {}, float(m[key]) * scale))

    raw = "eupe_eval_metric" if step == "evaluate" else "eupe_step_metric"
    out += [(raw, {"metric": k}, _number(v)) for k, v in m.items() if _number(v) is not None]
    if step in GATES and isinstance(m.get(GATES[step][0]), bool):
        out.append(("eupe_gate_passed", {"gate": GATES[step][1]}, float(m[GATES[step][0]])))
    add("eupe_step_images_per_second", "images_per_s")
    if step.startswith("train-stage"):
        add("eupe_train_first_loss", "first_loss", {"stage": step[len("train-stage"):]})
        add("eupe_train_final_loss", "last_loss", {"stage": step[len("train-stage"):]})
        add("eupe_skipped_images_total", "skipped_images")
    if step == "data-scan":
        add("eupe_read_bytes_total", "bytes")
    if step == "export":
        for k in m:
            for prefix, name in (("parity_cosine_", "eupe_export_parity_cosine"), ("bytes_", "eupe_export_program_size_bytes")):
                if k.startswith(prefix):
                    add(name, k, {"dtype": k[len(prefix):]})
        worst: dict[str, float] = {}
        for row in (export_models or {}).values():
            if _number(row.get("parity_max_abs")) is not None:
                worst[row["dtype"]] = max(worst.get(row["dtype"], 0.0), float(row["parity_max_abs"]))
        out += [("eupe_export_parity_max_abs", {"dtype": d}, v) for d, v in sorted(worst.items())]
    if step == "latency":
        for key in ("median", "p90", "budget"):
            add(f"eupe_latency_{key}_seconds", f"{key}_ms", scale=1e-3)
    return out


class _Samples:
    """A collector of fixed samples (no ``_created`` series, unlike a client-side Counter)."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for name, labels, value in self.samples:
            kind, text, names = STEP_METRICS[name]
            if name not in families:
                families[name] = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, text, labels=names)
            families[name].add_metric([labels[n] for n in names], value)
        return list(families.values())


_warned = False


def push(gateway: str, grouping: dict[str, str], samples: list[Sample], replace: bool = True) -> bool:
    """Push ``samples`` to the group ``grouping`` of job ``eupe``: PUT (``replace``) or POST. False, and one
    warning per process, when the gateway cannot be reached."""
    global _warned
    from prometheus_client import CollectorRegistry, push_to_gateway, pushadd_to_gateway

    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Samples(samples))
    try:
        (push_to_gateway if replace else pushadd_to_gateway)(gateway, job=JOB, registry=registry,
                                                             grouping_key=grouping, timeout=PUSH_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - a metrics outage (refused, timeout, HTTP error, bad URL) never fails a step
        if not _warned:
            _warned = True
            log.warning("metrics: could not push to the Pushgateway %s (%s: %s); the step goes on without its metrics",
                        gateway, type(e).__name__, e)
        return False


class StepMetrics:
    """One step's push, begun when its StepRun is made: :meth:`finish` pushes. At the process's exit a step
    still open (it raised, wrote result.json itself like promote, or computed again after an up-to-date
    check and raised) is pushed from its result.json, or as a failure when it wrote none. ``earlier``: the
    result.json its StepRun found there (a run before this one), which is not this run's: a step that fails
    on a bad input before it touches ``--out`` leaves it in place, and is pushed as a failure."""

    def __init__(self, step: str, out: str, gateway: str, grouping: dict[str, str]):
        self.step, self.out, self.gateway, self.grouping = step, out, gateway, grouping
        self.start, self.pushed, self.earlier = time.monotonic(), None, None

    def finish(self, result: dict, up_to_date: bool = False) -> None:
        if self in _open and not up_to_date:  # an up-to-date step may still compute again
            _open.remove(self)
        self.pushed = result
        ok = result.get("status") == "ok"
        samples = step_samples(self.step, result, time.monotonic() - self.start, ok, up_to_date,
                               export_models=_export_models(result) if self.step == "export" else None)
        push(self.gateway, self.grouping, samples, replace=ok)

    def at_exit(self) -> None:
        from eupe import storage

        _open.remove(self)
        uri = f"{self.out.rstrip('/')}/result.json"
        try:
            result = storage.read_result(self.out) if storage.exists(uri) else None
        except Exception:  # noqa: BLE001 - unreadable: the step did not finish
            result = None
        if not isinstance(result, dict) or result.get("step") != self.step or (
                self.pushed is None and result == self.earlier):  # an earlier run's, which this one left whole
            result = {"status": "failed"}
        elif self.pushed is not None and self.pushed.get("finished_at") == result.get("finished_at"):
            return  # the up-to-date result, pushed already
        self.finish(result)


_open: list[StepMetrics] = []  # begun, not pushed yet


def _export_models(result: dict) -> dict | None:
    from eupe import storage

    try:
        return storage.read_json(result["artifacts"]["export"]).get("models")
    except Exception:  # noqa: BLE001 - the cosine is in result.json; the max abs only when export.json reads
        return None


@atexit.register
def _flush_open() -> None:
    for run in list(_open):
        run.at_exit()


def begin(step: str, out: str) -> StepMetrics | None:
    """The push of a step starting now, or None without ``EUPE_PUSHGATEWAY``."""
    gateway = os.environ.get("EUPE_PUSHGATEWAY", "").strip()
    if not gateway:
        return None
    grouping = {"pipeline": os.environ.get("EUPE_PIPELINE", ""), "run": os.environ.get("EUPE_RUN_ID", ""),
                "step": os.environ.get("EUPE_STEP") or step}
    run = StepMetrics(step, out, gateway, grouping)
    _open.append(run)
    return run


def up_to_date(out: str, result: dict) -> None:
    """A step found up to date before any StepRun was made (``eupe.cli``'s quick check): its no-op success."""
    run = begin(str(result.get("step", "")), out)
    if run is not None:
        run.finish(result, up_to_date=True)


class TrainingMetrics:
    """The live gauges of one training stage, served on /metrics until :meth:`close`."""

    def __init__(self, server, gauges: dict, labels: dict[str, str], iters: int, batch_size: int):
        self.gauges, self.labels, self.iters, self.batch_size = gauges, labels, iters, batch_size
        self.port = server.server_port
        self._stop = weakref.finalize(self, _stop_server, server)  # also when the stage raises

    def update(self, step: int, loss: float, images_per_s: float, lr: float) -> None:
        """After optimizer step ``step`` (1-based) of the stage."""
        g = {name: gauge.labels(**self.labels) for name, gauge in self.gauges.items()}  # no series before step 1
        g["eupe_train_step"].set(step)
        g["eupe_train_loss"].set(loss)
        g["eupe_train_images_per_second"].set(images_per_s)
        g["eupe_train_eta_seconds"].set((self.iters - step) * self.batch_size / max(images_per_s, 1e-9))
        g["eupe_train_learning_rate"].set(lr)

    def close(self) -> None:
        self._stop()


class _Off:
    """No /metrics (no EUPE_METRICS_PORT, another rank, a port taken)."""

    def update(self, *args: Any) -> None: ...
    def close(self) -> None: ...


def _stop_server(server) -> None:
    server.shutdown()
    server.server_close()


def serve_training(stage: int, iters: int, batch_size: int, main: bool = True) -> TrainingMetrics | _Off:
    """With ``EUPE_METRICS_PORT`` set, on the main rank: /metrics served on that port while the stage runs.
    A port that cannot be bound logs a warning; training goes on."""
    port = os.environ.get("EUPE_METRICS_PORT", "").strip()
    if not main or not port:
        return _Off()
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    values = {"pipeline": os.environ.get("EUPE_PIPELINE", ""), "run": os.environ.get("EUPE_RUN_ID", ""), "stage": str(stage)}
    gauges = {name: Gauge(name, text, TRAINING_LABELS, registry=registry) for name, text in TRAINING_METRICS.items()}
    addr = os.environ.get("EUPE_METRICS_ADDR", "0.0.0.0")
    try:
        server, _ = start_http_server(int(port), addr, registry=registry)
    except (OSError, ValueError) as e:
        log.warning("metrics: cannot serve /metrics on %s:%s (%s); training goes on without it", addr, port, e)
        return _Off()
    log.info("stage%d: training metrics on http://%s:%d/metrics", stage, addr, server.server_port)
    return TrainingMetrics(server, gauges, values, iters, batch_size)
