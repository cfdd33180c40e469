"""Quality gate: compare an evaluation with a baseline ``eval.json`` (the model in production).

Direction-aware: ``depth_rmse`` may not rise by more than its tolerance, every other metric may not
drop by more than its tolerance. ``fidelity`` is one value per target (``fidelity.<target>``), each
held to the ``fidelity`` tolerance. A metric of the baseline that this run did not produce fails the
gate (``missing``) unless ``eval.allow_missing_metrics``, in which case it is skipped; a metric only
this run has is skipped.
"""

from __future__ import annotations

from typing import Any

from eupe import storage
from eupe.config import GATED_METRICS
from eupe.errors import EupeError


def gated_values(evaluation: dict[str, Any]) -> dict[str, float]:
    """The gated metrics of an ``eval.json`` as flat ``name -> value`` (``fidelity.<target>`` per target)."""
    out = {}
    for name in GATED_METRICS:
        value = evaluation.get(name)
        if isinstance(value, dict):
            out.update({f"{name}.{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def read_baseline(uri: str) -> dict[str, float]:
    """The baseline's gated metrics; fails (before any compute) when it has none. A registry pointer
    (``models/<name>/production.json``) stands for the eval.json of the version it points to."""
    try:
        if uri.endswith("production.json"):
            from eupe.registry.lineage import pointer_eval

            uri = pointer_eval(uri)
        data = storage.read_json(uri)
    except EupeError as e:
        raise EupeError(f"--baseline: {e}") from None
    values = gated_values(data) if isinstance(data, dict) else {}
    if not values:
        raise EupeError(f"--baseline {uri}: not an eval.json (none of {sorted(GATED_METRICS)} found)")
    return values


def check(current: dict[str, Any], baseline: dict[str, float], tolerances: dict[str, float],
          allow_missing: bool = False) -> dict[str, Any]:
    """The gate outcome: ``{"passed", "regressed": [names], "missing": [names], "checks": [...], "skipped": [names]}``."""
    values = gated_values(current)
    checks, skipped, missing = [], [], []
    for key in sorted(set(values) | set(baseline)):
        metric = key.split(".", 1)[0]
        if key not in values and key in baseline and not allow_missing:
            missing.append(key)
            continue
        if key not in values or key not in baseline:
            skipped.append(key)
            continue
        higher = GATED_METRICS[metric]
        tol = tolerances.get(metric, 0.0)
        value, base = values[key], baseline[key]
        regressed = value < base - tol if higher else value > base + tol
        checks.append({"metric": key, "value": value, "baseline": base, "tolerance": tol,
                       "higher_is_better": higher, "regressed": regressed})
    regressed = [c["metric"] for c in checks if c["regressed"]]
    return {"passed": not regressed and not missing, "regressed": regressed, "missing": missing, "checks": checks,
            "skipped": skipped}


def failure_message(outcome: dict[str, Any], baseline_uri: str) -> str:
    """One line naming each regressed metric with its value, the baseline and the tolerance, and each
    baseline metric this run lacks."""
    parts = []
    for c in outcome["checks"]:
        if c["regressed"]:
            sign = "-" if c["higher_is_better"] else "+"
            word = "dropped" if c["higher_is_better"] else "rose"
            parts.append(f"{c['metric']} {word} to {c['value']:.4f} (baseline {c['baseline']:.4f} {sign} tolerance {c['tolerance']:g})")
    if outcome.get("missing"):
        parts.append(f"{', '.join(outcome['missing'])} missing from this run but present in the baseline "
                     "(eval.allow_missing_metrics=true skips them)")
    return f"quality gate failed against {baseline_uri}: " + "; ".join(parts)
