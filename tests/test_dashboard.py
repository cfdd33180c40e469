"""dashboards/eupe-grafana.json: valid JSON, and every PromQL query names only metrics the code exports
(eupe.metrics), so a renamed metric cannot leave a panel silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

from eupe import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "eupe-grafana.json"
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def panels(items: list[dict]):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))  # panels inside rows


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q))  # Grafana's function: its selector is PromQL
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: identifiers outside strings, label matchers, ranges and
    grouping clauses that are neither functions, keywords nor parts of numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", text):
        if text[m.end():].lstrip().startswith("(") or m.group() in KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_the_parser_finds_metric_names_only():
    assert metric_names('count(eupe_step_success{run=~"$run", step="a b"} == 0) or vector(0)') == {"eupe_step_success"}
    assert metric_names("time() - eupe_x_seconds offset 5m") == {"eupe_x_seconds"}
    assert metric_names('sum by (run) (rate(eupe_y_total[$__rate_interval])) / 1e3 > bool eupe_z') == {"eupe_y_total", "eupe_z"}


def test_every_query_of_the_dashboard_names_exported_metrics_only():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = metrics.exported_names()
    exprs = queries(dashboard)
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} names {sorted(names - exported)}, not exported by eupe.metrics"
        used |= names
    # what the dashboard is for: training loss and rate per run, eval metrics, latency vs budget, step health
    assert {"eupe_train_loss", "eupe_train_images_per_second", "eupe_eval_metric", "eupe_latency_median_seconds",
            "eupe_latency_budget_seconds", "eupe_step_duration_seconds", "eupe_step_success"} <= used


def test_the_dashboard_is_a_well_formed_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for p in panels(dashboard["panels"]):
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"]
            assert set(re.findall(r"\$(\w+)", t["expr"])) <= names, t["expr"]
