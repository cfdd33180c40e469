"""``eupe promote``: publish a model whose gates passed, then move the production pointer.

``<root>/models/<name>/<version>/`` gets the encoder, every ``.pte``, ``eval.json``, ``export.json`` (the rows
of every ``--export`` folder merged: the pipeline runs one export per resolution x dtype), one
``latency_<pte>_<device class>.json`` per latency run, ``config.yaml`` (with ``--config``/``--set``) and
``lineage.json``, then ``_SUCCESS`` (:func:`eupe.storage.upload_dir`: a local folder appears at once by a
rename, an S3 prefix gets its marker after every object). ``<root>/models/<name>/production.json`` is
written last (one atomic write), so a reader of the pointer never sees a half-published version.

Every file is staged (and hashed) in a local temporary folder before anything is published: a missing
input fails with nothing under ``models/``. The quality gate is checked again here against the eval.json
that production points to *now* (with the tolerances the evaluation ran with), so a model gated against a
production that has moved since is not promoted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eupe import storage
from eupe.errors import EupeError, GateFailed
from eupe.evaluate import gate
from eupe.registry import lineage as lin
from eupe.registry.lineage import model_root, read_pointer, versions
from eupe.step import StepRun

log = logging.getLogger(__name__)

STEP = "promote"


@dataclass
class Inputs:
    """The step folders being promoted, read and checked (see :func:`read_inputs`)."""

    encoder: str
    eval_dir: str
    evaluation: dict
    eval_result: dict
    exports: list[tuple[str, dict, dict]]  # (folder, result.json, export.json), one per `eupe export` run
    export: dict  # their export.json merged: one header, every folder's `models` rows (published as export.json)
    latency: list[tuple[str, dict, dict]] = field(default_factory=list)  # (folder, result.json, latency.json)
    dataset: dict | None = None
    checkpoints: list[dict] = field(default_factory=list)
    config: dict | None = None
    config_text: str | None = None


# --------------------------------------------------------------------------- inputs and gates


def _json_in(folder: str, file: str, flag: str) -> dict:
    uri = f"{folder.rstrip('/')}/{file}"
    if not storage.exists(uri):
        raise EupeError(f"{flag} {folder}: no {file}")
    data = storage.read_json(uri)
    if not isinstance(data, dict):
        raise EupeError(f"{uri}: expected a JSON object")
    return data


def _latency_name(report: dict) -> str:
    device = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(report.get("device_class") or report.get("device") or "device"))
    return f"latency_{Path(str(report.get('pte'))).stem}_{device}.json"


def read_inputs(encoder: str, eval_dir: str, export_dirs: list[str], latency_dirs: list[str], data_version: str | None = None,
                checkpoint_versions: list[str] | None = None, config: str | None = None,
                overrides: list[str] | None = None) -> Inputs:
    """Each input folder's result.json must be from the right step; fails in one line naming the flag otherwise."""
    if not encoder.endswith(".safetensors"):
        raise EupeError(f"--encoder {encoder}: expected the trained encoder's .safetensors file")
    if not storage.exists(encoder) or (not storage.is_s3(encoder) and not Path(encoder).is_file()):
        raise EupeError(f"--encoder {encoder}: file not found")
    eval_dir = eval_dir.rstrip("/")
    eval_result = lin.step_result(eval_dir, "--eval", ("evaluate",))
    inputs = Inputs(encoder, eval_dir, _json_in(eval_dir, "eval.json", "--eval"), eval_result, *_exports(export_dirs))
    ptes = {Path(str(m["pte"])).name for m in inputs.export["models"].values()}
    if not latency_dirs:
        raise EupeError("--latency: at least one latency step folder is required")
    for folder in (d.rstrip("/") for d in latency_dirs):
        result = lin.step_result(folder, "--latency", ("latency",))
        report = _json_in(folder, "latency.json", "--latency")
        if report.get("passed") is None:
            raise EupeError(f"--latency {folder}: measured without a budget (passed: null); run eupe latency --budgets")
        if Path(str(report.get("pte"))).name not in ptes:
            raise EupeError(f"--latency {folder}: times {report.get('pte')}, "
                            f"not a .pte of --export ({', '.join(sorted(ptes))})")
        if any(_latency_name(r) == _latency_name(report) for _, _, r in inputs.latency):
            raise EupeError(f"--latency {folder}: {_latency_name(report)} given twice")
        inputs.latency.append((folder, result, report))
    inputs.dataset = lin.dvc_version(data_version.rstrip("/"), "--data-version") if data_version else None
    inputs.checkpoints = [lin.dvc_version(c.rstrip("/"), "--checkpoint-version") for c in checkpoint_versions or []]
    inputs.config, inputs.config_text = lin.config_record(config, list(overrides or []))
    return inputs


def _exports(folders: list[str]) -> tuple[list[tuple[str, dict, dict]], dict]:
    """Each export folder (one per resolution x dtype in a fanned-out pipeline) and their merged export.json;
    they must have exported the same model (encoder, weights, input normalization) under distinct names."""
    if not folders:
        raise EupeError("--export: at least one export step folder is required")
    exports: list[tuple[str, dict, dict]] = []
    merged: dict[str, Any] = {}
    for folder in sorted(f.rstrip("/") for f in folders):  # the same folders in any order: the same export.json
        result = lin.step_result(folder, "--export", ("export",))
        report = _json_in(folder, "export.json", "--export")
        models = report.get("models")
        if not (isinstance(models, dict) and models and all(isinstance(m, dict) and m.get("pte") for m in models.values())):
            raise EupeError(f"--export {folder}/export.json: no 'models' rows with a 'pte'")
        header = {k: report.get(k) for k in ("encoder", "model", "weights", "input")}
        if merged and header != {k: merged.get(k) for k in header}:
            raise EupeError(f"--export {folder}: exported another model than {exports[0][0]} (encoder, model, weights "
                            "or input differ)")
        merged = merged or {**report, "models": {}}
        for name, row in models.items():
            pte = Path(str(row["pte"])).name
            clash = [f for f, _, r in exports if pte in {Path(str(m["pte"])).name for m in r["models"].values()}]
            if name in merged["models"] or clash:
                raise EupeError(f"--export {folder}: {name} ({pte}) also exported by {clash[0] if clash else folder}")
            merged["models"][name] = {**row, "pte": pte}  # published next to export.json
        exports.append((folder, result, report))
    return exports, merged


def _export_problem(name: str, row: dict) -> str:
    cosine, bound = row.get("parity_cosine"), row.get("min_cosine")
    if isinstance(cosine, (int, float)) and isinstance(bound, (int, float)) and cosine < bound:
        return f"{name} parity cosine {cosine:.5f} < {bound}"
    ops = ", ".join(f"{op} x{k}" for op, k in (row.get("non_delegated_ops") or {}).items())
    return f"{name} not fully delegated to XNNPACK{f' ({ops})' if ops else ''}"


def gate_failures(inputs: Inputs) -> list[tuple[str, str]]:
    """``[(gate, reason)]`` for the quality, export and latency gates that did not pass (empty: all passed)."""
    failed = []
    outcome, status = inputs.evaluation.get("gate"), inputs.eval_result.get("status")
    if isinstance(outcome, dict) and outcome.get("passed") is False:
        failed.append(("quality", gate.failure_message({"checks": [], **outcome}, outcome.get("baseline"))))
    elif status != "ok":
        failed.append(("quality", f"quality gate: evaluate finished {status!r} ({inputs.eval_dir}/result.json)"))
    for folder, result, report in inputs.exports:
        rows = [(n, m) for n, m in report["models"].items() if m.get("passed") is False]
        if rows or result.get("status") != "ok":
            why = [_export_problem(n, m) for n, m in rows] or [f"export finished {result.get('status')!r}"]
            failed.append(("export", f"export gate failed ({folder}/export.json): {'; '.join(why)}"))
    for folder, result, r in inputs.latency:
        if r.get("passed") is False or result.get("status") != "ok":
            median, budget = float(r.get("median_ms") or "nan"), float(r.get("budget_ms") or "nan")
            failed.append(("latency", f"latency gate failed ({folder}/latency.json): {Path(str(r.get('pte'))).name} "
                                      f"median {median:.2f} ms over the {budget:g} ms budget of "
                                      f"{r.get('device_class')}/{r.get('model')}/{r.get('resolution')}px"))
    return failed


def recheck_quality(evaluation: dict, production_eval: str) -> dict:
    """The quality gate of this evaluation against the eval.json production points to, with its own tolerances."""
    from eupe.config import EvalConfig

    setup = (evaluation.get("setup") or {}).get("eval") or {}
    defaults = EvalConfig()
    tolerances = setup.get("tolerances") if isinstance(setup.get("tolerances"), dict) else defaults.tolerances
    baseline = storage.read_json(production_eval)
    return gate.check(evaluation, gate.gated_values(baseline) if isinstance(baseline, dict) else {}, tolerances,
                      bool(setup.get("allow_missing_metrics", defaults.allow_missing_metrics)))


# --------------------------------------------------------------------------- publishing


def _copy(src: str, dest: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with storage.open_read(src) as f, open(dest, "wb") as g:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            g.write(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size, "source": src}


def stage(inputs: Inputs, tmp: Path) -> dict[str, dict]:
    """Copy every file to publish into ``tmp`` (hashing it); ``{name: {"sha256", "bytes", "source"}}``."""
    files = {"encoder.safetensors": ("--encoder", inputs.encoder), "eval.json": ("--eval", f"{inputs.eval_dir}/eval.json")}
    for folder, _, report in inputs.exports:  # each .pte next to its export.json, wherever it was written from
        files.update({Path(str(m["pte"])).name: ("--export", f"{folder}/{Path(str(m['pte'])).name}")
                      for m in report["models"].values()})
    files.update({_latency_name(r): ("--latency", f"{d}/latency.json") for d, _, r in inputs.latency})
    folder = f"{inputs.encoder.rsplit('/', 1)[0]}/model"  # the timm/HF model folder training wrote beside it
    if storage.exists(f"{folder}/config.json"):
        files.update({f"model/{n}": ("--encoder", f"{folder}/{n}") for n in ("config.json", "model.safetensors")})
    staged = {}
    for name, (flag, src) in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            staged[name] = _copy(src, tmp / name)
        except EupeError as e:
            raise EupeError(f"{flag}: {e}") from None
    written = {"export.json": (json.dumps(inputs.export, indent=2) + "\n", [f for f, _, _ in inputs.exports])}
    if inputs.config_text is not None:
        written["config.yaml"] = (inputs.config_text, inputs.config["source"])
    for name, (text, source) in written.items():
        data = text.encode()
        (tmp / name).write_bytes(data)
        staged[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "source": source}
    return staged


def _fail(run: StepRun, name: str, failed: list[tuple[str, str]]) -> GateFailed:
    reason = "; ".join(r for _, r in failed)
    metrics = {"name": name, "published": False, "failed_gates": [g for g, _ in failed], "reason": reason}
    run.finish(metrics, {}, status="failed")
    return GateFailed(reason)


def promote(inputs: Inputs, name: str, root: str, out: str, run_id: str | None = None) -> dict:
    """Publish ``inputs`` as the next version of ``name`` and point production at it; see the module doc."""
    base = model_root(root, name)
    pointer_uri = f"{base}/{lin.POINTER_FILE}"
    tmp = Path(tempfile.mkdtemp(prefix="eupe-promote-"))
    try:
        failed = gate_failures(inputs)

        def check() -> tuple | None:  # the pointer and every file to publish are read (staged) before --out is
            # touched: an input file that is gone fails with an earlier run's output there kept whole
            if failed:
                return None
            return read_pointer(pointer_uri) if storage.exists(pointer_uri) else None, stage(inputs, tmp)

        run = StepRun(out, STEP, check=check)  # --out checked, a stale result.json dropped
        if failed:
            raise _fail(run, name, failed)
        current, files = run.checked
        key = {"files": {n: f["sha256"] for n, f in sorted(files.items())},
               "dataset": (inputs.dataset or {}).get("hash"), "checkpoints": [c["hash"] for c in inputs.checkpoints]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        if current is not None:
            if lin.read_lineage(current["uri"]).get("digest") == digest:
                log.info("%s version %d already holds these inputs", name, current["version"])
                metrics = {"name": name, "version": current["version"], "published": False, "already_production": True}
                return run.finish(metrics, {"version": current["uri"], "production": pointer_uri})
            outcome = recheck_quality(inputs.evaluation, current["eval"])
            if not outcome["passed"]:
                raise _fail(run, name, [("quality", gate.failure_message(outcome, current["eval"]))])
        version = max(versions(root, name), default=0) + 1
        uri = f"{base}/{version}"
        if storage.exists(uri):
            raise EupeError(f"{uri} appeared while publishing: another promote of {name} is running")
        record = lin.collect(inputs, name=name, version=version, uri=uri, run_id=run_id, digest=digest, files=files,
                             previous=current and current["version"],
                             latency={_latency_name(r)[len("latency_") : -len(".json")]: r for _, _, r in inputs.latency})
        storage.write_json(str(tmp / lin.LINEAGE_FILE), record)
        log.info("publishing %s version %d to %s (%d files)", name, version, uri, len(files) + 1)
        storage.upload_dir(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = {"name": name, "version": version, "uri": uri, "eval": f"{uri}/eval.json",
               "lineage": f"{uri}/{lin.LINEAGE_FILE}", "promoted_at": record["promoted_at"], "run_id": run_id}
    storage.write_json(pointer_uri, pointer)  # last: production moves only to a complete version
    metrics = {"name": name, "version": version, "published": True, "previous": record["previous"]}
    return run.finish(metrics, {"version": uri, "production": pointer_uri, "lineage": pointer["lineage"]})
