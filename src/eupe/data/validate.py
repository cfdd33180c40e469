"""``eupe data validate``: the data gate, a Great Expectations suite over the scan manifest.

The manifest (``eupe.data.manifest``) gets a few derived columns (shortest side, one 0/1 column per
stage-3 resolution bucket, class and domain imbalance, the file a duplicate repeats, the robust
outlier score), then an ephemeral GX context validates it with one expectation per check (the suite is also a
file of the repository's GX project, ``gx/expectations/eupe_data.json``, where people review it and add their
own expectations: ``eupe.data.gx_suite``):

=====================  ==============================================================  ==========
check                  expectation                                                     default
=====================  ==============================================================  ==========
decodable              ``decodable`` in {True}                                         fail
formats                ``format`` in ``validation.allowed_formats``                    fail
min_side               ``short_side`` >= ``validation.min_side``                       fail
resolution_bucket_R    sum of ``bucket_R`` (short side >= R) >= ``min_per_bucket``     warn
class_balance          max of ``class_ratio`` (largest / this class) <= bound          fail
domain_balance         max of ``domain_ratio`` <= bound                                warn
duplicates             ``sha256`` unique                                               fail
outliers               ``outlier_z`` <= ``validation.outlier_z``                       warn
=====================  ==============================================================  ==========

Severities are ``validation.severity.*``. The rows GX reports as unexpected become ``bad_files`` in
``validation.json``, each with a reason. Data Docs (HTML, self-contained: ``eupe.data.data_docs``) and PNG
plots are written next to it, and
only then does a broken "fail" expectation raise :class:`EupeError` (exit code 2).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from eupe import storage
from eupe.config import Config
from eupe.data.data_docs import make_offline
from eupe.data.gx_suite import SUITE_NAME, suite_file, user_expectations
from eupe.data.manifest import MANIFEST_FILE, open_dataset, read_manifest, write_manifest
from eupe.data.outliers import robust_scores
from eupe.errors import EupeError
from eupe.fingerprint import fingerprint
from eupe.step import StepRun

__all__ = ["VALIDATION_FILE", "prepare", "run_validate", "validate_manifest"]

logger = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"


# --------------------------------------------------------------------------- derived columns


def _imbalance(values: pd.Series, usable: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """Per row: count of the largest group / count of this row's group (NaN when unknown)."""
    known = usable & values.notna()
    counts = values[known].value_counts()
    if counts.empty:
        return pd.Series(np.nan, index=values.index), {}
    ratio = pd.Series(np.nan, index=values.index)
    ratio[known] = counts.max() / values[known].map(counts).astype(float)
    return ratio, {str(k): int(v) for k, v in sorted(counts.items())}


def _modified(uri: str) -> float:
    """A local file's modification time; NaN for anything else (S3 objects, .tar members ``shard#key``)."""
    if storage.is_s3(uri):
        return np.nan
    try:
        return os.stat(uri).st_mtime
    except OSError:
        return np.nan


def duplicate_of(df: pd.DataFrame) -> pd.Series:
    """Per row: the file it repeats (same sha256), or NaN. The earliest copy is the original: the oldest local
    file by modification time, then the first in the dataset's order; every later copy is its duplicate."""
    hashed = df[df["sha256"].notna()]
    if hashed.empty:
        return pd.Series(np.nan, index=df.index, dtype=object)
    age = hashed.assign(_modified=hashed["uri"].map(_modified), _order=np.arange(len(hashed)))
    first = age.sort_values(["_modified", "_order"], na_position="last").groupby("sha256")["uri"].transform("first")
    first = first.reindex(hashed.index)
    return first.where(first != hashed["uri"]).reindex(df.index)


def prepare(manifest: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest plus the columns the suite checks, and a summary (counts per bucket, class, domain)."""
    df = manifest.reset_index(drop=True).copy()
    ok = df["decodable"].fillna(False).astype(bool)
    df["short_side"] = np.fmin(df["width"].astype(float), df["height"].astype(float)).where(ok)
    buckets = {}
    for r in sorted(set(cfg.stage3.resolutions)):
        df[f"bucket_{r}"] = (df["short_side"] >= r).astype(int)
        buckets[str(r)] = int(df[f"bucket_{r}"].sum())
    df["class_ratio"], class_counts = _imbalance(df["label"], ok)
    df["domain_ratio"], domain_counts = _imbalance(df["domain"], ok)
    df["duplicate_of"] = duplicate_of(df)
    df[["outlier_z", "outlier_feature"]] = robust_scores(df)
    summary = {"images": len(df), "decodable": int(ok.sum()), "buckets": buckets,
               "class_counts": class_counts, "domain_counts": domain_counts}
    return df, summary


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class Check:
    name: str
    severity: str  # "fail" | "warn"
    expectation: Any  # a great_expectations Expectation
    reason: Callable[[pd.Series], str | None] | None = None  # row -> why it is bad (None: not a bad file)


def _fmt_side(row: pd.Series) -> str:
    return f"{int(row['width'])}x{int(row['height'])}"


def _checks(df: pd.DataFrame, cfg: Config) -> list[Check]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    v, sev = cfg.validation, cfg.validation.severity
    level = {"fail": FailureSeverity.CRITICAL, "warn": FailureSeverity.WARNING}

    def check(name: str, severity: str, cls: Any, description: str, reason=None, **kwargs: Any) -> Check:
        exp = cls(**kwargs, description=f"{name} ({severity}): {description}", severity=level[severity],
                  meta={"eupe_check": name, "eupe_severity": severity})
        return Check(name, severity, exp, reason)

    checks = [
        check("decodable", sev.decodable, gxe.ExpectColumnValuesToBeInSet, "every file reads and decodes",
              lambda r: r["error"] or "undecodable", column="decodable", value_set=[True]),
        check("formats", sev.formats, gxe.ExpectColumnValuesToBeInSet, f"format in {v.allowed_formats}",
              lambda r: f"format {r['format']} not allowed ({', '.join(v.allowed_formats)})",
              column="format", value_set=list(v.allowed_formats)),
        check("min_side", sev.min_side, gxe.ExpectColumnValuesToBeBetween, f"shortest side >= {v.min_side} px",
              lambda r: f"too small: {_fmt_side(r)} (shortest side < {v.min_side})",
              column="short_side", min_value=v.min_side),
    ]
    per_bucket = v.min_per_bucket
    for r in sorted(set(cfg.stage3.resolutions)):
        need = per_bucket if isinstance(per_bucket, int) else per_bucket.get(r, 0)
        checks.append(check(f"resolution_bucket_{r}", sev.resolution_buckets, gxe.ExpectColumnSumToBeBetween,
                            f"at least {need} images with shortest side >= {r} px (stage-3 bucket)",
                            column=f"bucket_{r}", min_value=need))
    if df["class_ratio"].notna().any():
        checks.append(check("class_balance", sev.class_balance, gxe.ExpectColumnMaxToBeBetween,
                            f"largest / smallest class count <= {v.max_class_ratio}",
                            column="class_ratio", max_value=v.max_class_ratio))
    if df["domain_ratio"].notna().any():
        checks.append(check("domain_balance", sev.domain_balance, gxe.ExpectColumnMaxToBeBetween,
                            f"largest / smallest domain count <= {v.max_domain_ratio}",
                            column="domain_ratio", max_value=v.max_domain_ratio))
    checks += [
        check("duplicates", sev.duplicates, gxe.ExpectColumnValuesToBeUnique, "no two files with the same sha256",
              lambda r: f"duplicate of {r['duplicate_of']}" if isinstance(r["duplicate_of"], str) else None,
              column="sha256"),
        check("outliers", sev.outliers, gxe.ExpectColumnValuesToBeBetween,
              f"robust z of channel means and log contrast <= {v.outlier_z}",
              lambda r: f"outlier: robust z {r['outlier_z']:.1f} on {r['outlier_feature']} (> {v.outlier_z})",
              column="outlier_z", max_value=v.outlier_z),
    ]
    return checks


def _with_user_checks(checks: list[Check], path: Path | None) -> list[Check]:
    """The built-in checks plus the expectations people added to the suite file (``eupe.data.gx_suite``)."""
    extra = [Check(name, severity, exp) for name, severity, exp in user_expectations(path)]
    clash = sorted({c.name for c in checks} & {c.name for c in extra})
    if clash:
        raise EupeError(f"expectation suite {path}: meta.name {', '.join(clash)} is a built-in check's name")
    return checks + extra


def _context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                             ProgressBarsConfig)

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are internal chatter
    site = {"class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())}}
    config = DataContextConfig(analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False),
                               store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               data_docs_sites={"eupe": site})
    return gx.get_context(mode="ephemeral", project_config=config)


def _plain(value: Any) -> Any:
    """GX results hold numpy scalars; JSON wants Python ones."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _raised(info: dict | None) -> str | None:
    """GX's exception info is flat or keyed by metric; the first message of a raised exception."""
    for entry in [info or {}, *(v for v in (info or {}).values() if isinstance(v, dict))]:
        if entry.get("raised_exception"):
            return entry.get("exception_message") or "unknown error"
    return None


def _run_suite(df: pd.DataFrame, checks: list[Check], docs_dir: Path) -> list[dict[str, Any]]:
    """Validate ``df`` with ``checks`` through a GX checkpoint that also builds Data Docs into ``docs_dir``.
    Returns, per check, GX's success, observed value and the ``uri`` of every unexpected row."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(docs_dir)
    batch = context.data_sources.add_pandas("manifest").add_dataframe_asset("images") \
        .add_batch_definition_whole_dataframe("all_images")
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=[c.expectation for c in checks]))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="manifest", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="eupe_data_gate", validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="data_docs", site_names=["eupe"])],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["uri"]}))
    result = checkpoint.run(batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name="eupe-data-validate"))
    (validation,) = result.run_results.values()
    by_name = {r.expectation_config.meta["eupe_check"]: r for r in validation.results}
    out = []
    for c in checks:
        r = by_name[c.name]
        res = dict(r.result or {})
        error = _raised(r.exception_info)
        if error:  # a check that could not run is a bug or a malformed manifest, never a silent "failed"
            raise EupeError(f"validation check {c.name} could not run: {' '.join(str(error).split())}")
        observed = res.get("observed_value")
        if observed is None and "unexpected_count" in res:
            observed = {"unexpected_count": res["unexpected_count"],
                        "unexpected_percent": res.get("unexpected_percent")}
        out.append({"name": c.name, "severity": c.severity, "success": bool(r.success),
                    "expectation": r.expectation_config.type,
                    "column": r.expectation_config.kwargs.get("column"), "observed": _plain(observed),
                    "unexpected_uris": [u["uri"] for u in res.get("unexpected_index_list") or []]})
    return out


# --------------------------------------------------------------------------- the step


def _bad_files(df: pd.DataFrame, checks: list[Check], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per bad file, in manifest order, with every reason it was flagged for."""
    rows = df.set_index("uri", drop=False)
    found: dict[str, list[tuple[str, str]]] = {}
    for check, res in zip(checks, results):
        if check.reason is None:
            continue
        for uri in res["unexpected_uris"]:
            why = check.reason(rows.loc[uri])
            if why:
                found.setdefault(uri, []).append((check.name, why))
    return [{"path": uri, "reason": "; ".join(w for _, w in found[uri]), "checks": [n for n, _ in found[uri]]}
            for uri in df["uri"] if uri in found]


def validate_manifest(manifest: pd.DataFrame, cfg: Config, out: str | Path, source: str | None = None,
                      final: str | None = None) -> dict[str, Any]:
    """Run the suite over ``manifest``; write ``validation.json``, ``data_docs/`` and the plots under
    ``out`` (``source``: where the manifest came from, for the record; ``final``: where ``out`` is published,
    for the paths in the report). Returns the report; raising on a broken "fail" expectation is the caller's job."""
    from eupe.data.audit_plots import balance_bars, resolution_histogram, stats_scatter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    where = str(final or out).rstrip("/")
    df, summary = prepare(manifest, cfg)
    suite = suite_file()
    checks = _with_user_checks(_checks(df, cfg), suite)
    with storage.atomic_dir(out / DATA_DOCS_DIR) as docs:
        results = _run_suite(df, checks, docs)
        make_offline(docs)  # bundled CSS/JS instead of CDNs: renders on an air-gapped cluster
    bad = _bad_files(df, checks, results)
    failed = [r["name"] for r in results if not r["success"] and r["severity"] == "fail"]
    warned = [r["name"] for r in results if not r["success"] and r["severity"] == "warn"]
    outliers = df["outlier_z"].fillna(0.0) > cfg.validation.outlier_z
    plots = {
        "resolution_histogram": resolution_histogram(df, cfg.stage3.resolutions, cfg.validation.min_side,
                                                     out / "resolution_histogram.png"),
        "balance": balance_bars({"class": summary["class_counts"], "domain": summary["domain_counts"]},
                                out / "balance.png"),
        "stats_scatter": stats_scatter(df, outliers, out / "stats_scatter.png"),
    }
    report = {
        "passed": not failed, "failed": failed, "warnings": warned, "manifest": source,
        "suite": str(suite) if suite else None, **summary,
        "num_bad_files": len(bad), "outlier_z": cfg.validation.outlier_z,
        "expectations": [{k: v for k, v in r.items() if k != "unexpected_uris"} for r in results],
        "bad_files": bad,
        "data_docs": f"{where}/{DATA_DOCS_DIR}/index.html",
        "plots": {k: f"{where}/{Path(v).name}" for k, v in plots.items()},
    }
    storage.write_json(str(out / VALIDATION_FILE), report)
    return report


def run_validate(cfg: Config, data: str | None, out: str | Path, manifest: str | None = None,
                 workers: int | None = None) -> dict[str, Any]:
    """``eupe data validate``: scan ``data`` (unless a ``manifest`` is given), validate, write the
    report and ``result.json``; raise :class:`EupeError` with a one-line summary when a "fail"
    expectation is broken (after everything is written)."""
    start = time.perf_counter()
    if manifest is None:
        if not data:
            raise EupeError("data validate: give --data (a dataset to scan) or --manifest")
        source = open_dataset(data)
    suite = suite_file()  # an input: an edited suite file is a new run (its content is in the fingerprint)
    inputs = {"data": data, "manifest": manifest, "suite": str(suite) if suite else None}

    def check() -> pd.DataFrame | None:  # a --manifest unread or listing nothing fails before --out is touched
        if manifest is None:
            return None
        given = read_manifest(manifest)
        if given.empty:
            raise EupeError(f"manifest {manifest} lists no images")
        return given

    run = StepRun(out, "data-validate", fingerprint("data-validate", inputs, cfg), check=check)
    if run.done:
        return storage.read_json(run.done["artifacts"]["validation"])
    with run.staging() as tmp:
        if manifest is None:
            write_manifest(source, tmp / MANIFEST_FILE, workers=workers or os.cpu_count() or 1,
                           max_pixels=cfg.validation.max_pixels)
            table, manifest = read_manifest(str(tmp / MANIFEST_FILE)), run.path(MANIFEST_FILE)
        else:
            table = run.checked
        if table.empty:
            raise EupeError(f"manifest {manifest} lists no images")
        report = validate_manifest(table, cfg, tmp, source=str(manifest), final=run.out)
    metrics = {k: report[k] for k in ("passed", "images", "decodable", "num_bad_files", "failed", "warnings",
                                      "buckets", "class_counts", "domain_counts")}
    metrics["wall_s"] = round(time.perf_counter() - start, 3)
    artifacts = {"validation": run.path(VALIDATION_FILE), "manifest": manifest, "data_docs": report["data_docs"],
                 **report["plots"]}
    run.finish(metrics, artifacts, status="ok" if report["passed"] else "failed")
    if not report["passed"]:
        first = report["bad_files"][0] if report["bad_files"] else None
        example = f", first {first['path']}: {first['reason']}" if first else ""
        raise EupeError(f"data validation failed: {', '.join(report['failed'])}; "
                        f"{report['num_bad_files']} bad files{example} (see {run.path(VALIDATION_FILE)})")
    return report
