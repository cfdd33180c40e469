"""The read side of the registry, and the lineage of a published model.

Layout: ``<root>/models/<name>/<version>/`` (1, 2, ...) and ``<root>/models/<name>/production.json``, the
pointer. ``lineage.json`` in every version folder says where the model came from (data and checkpoint DVC
hashes, config, code version, run id); :func:`collect` builds it at promote time and :func:`read_lineage`
reads it back from a version folder or through a pointer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import eupe
from eupe import storage
from eupe.errors import EupeError
from eupe.results import read_result

log = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
POINTER_FILE = "production.json"
VERSION_STEPS = ("data-version", "data-pull")  # `eupe data version|pull --out DIR` write a DVC `hash`
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# --------------------------------------------------------------------------- the registry layout


def model_root(root: str, name: str) -> str:
    if not _NAME.match(name):
        raise EupeError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    root = root.rstrip("/") if storage.is_s3(root) else str(Path(root).absolute())
    return f"{root}/models/{name}"


def read_pointer(uri: str) -> dict[str, Any]:
    """A ``production.json``: ``{"name", "version", "uri", "eval", "promoted_at", "run_id"}``."""
    pointer = storage.read_json(uri)
    if not (isinstance(pointer, dict) and isinstance(pointer.get("version"), int)
            and all(isinstance(pointer.get(k), str) for k in ("uri", "eval"))):
        raise EupeError(f"{uri}: not a production pointer (needs integer 'version', 'uri' and 'eval')")
    return pointer


def pointer_eval(uri: str) -> str:
    """The eval.json of the version a ``production.json`` points to (what ``--baseline POINTER`` compares with)."""
    return read_pointer(uri)["eval"]


def production_baseline(root: str, name: str) -> str | None:
    """The production model's eval.json URI, or None when nothing is published under ``name`` yet."""
    pointer = f"{model_root(root, name)}/{POINTER_FILE}"
    return pointer_eval(pointer) if storage.exists(pointer) else None


def versions(root: str, name: str) -> list[int]:
    """Version numbers under ``models/<name>/``, complete or not (a number is never reused)."""
    base = model_root(root, name)
    if storage.is_s3(base):
        heads = [u[len(base) + 1 :].split("/", 1)[0] for u in storage.list_uris(base + "/")]
    else:
        heads = [p.name for p in Path(base).iterdir() if p.is_dir()] if Path(base).is_dir() else []
    return sorted({int(h) for h in heads if h.isdigit()})


# --------------------------------------------------------------------------- lineage


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``eupe.__version__``, plus the git commit (and whether tracked files differ from it) when the package's
    own files are tracked in a git checkout; never fails without git or outside a checkout."""
    here = Path(eupe.__file__).resolve().parent
    record: dict[str, Any] = {"eupe": eupe.__version__, "git_commit": None, "git_dirty": None}
    if _git(["ls-files", "--error-unmatch", "__init__.py"], here) is None:  # an installed copy, not a checkout
        return record
    commit = _git(["rev-parse", "HEAD"], here)
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], here)
        record.update(git_commit=commit, git_dirty=bool(status) if status is not None else None)
    return record


def dvc_version(uri: str, flag: str) -> dict[str, Any]:
    """The DVC hash recorded by ``eupe data version --out URI`` (or ``eupe data pull --out``)."""
    result = step_result(uri, flag, VERSION_STEPS)
    value = result.get("metrics", {}).get("hash")
    if not isinstance(value, str) or not value:
        raise EupeError(f"{flag} {uri}: result.json has no DVC metrics.hash")
    metrics, artifacts = result["metrics"], result.get("artifacts", {})
    return {"hash": value, "path": artifacts.get("path"), "dvc_file": artifacts.get("dvc_file"),
            "nfiles": metrics.get("nfiles"), "size": metrics.get("size"), "result": uri}


def config_record(config: str | None, overrides: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """The resolved recipe's name and sha256 (and its YAML, published as config.yaml); None when not given."""
    if config is None and not overrides:
        return None, None
    from eupe.config import dump_config, load_config

    cfg = load_config(config, overrides)
    text = dump_config(cfg)
    return {"name": cfg.name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "source": config or "<defaults>",
            "overrides": list(overrides)}, text


def step_result(uri: str, flag: str, steps: tuple[str, ...]) -> dict[str, Any]:
    """``URI/result.json`` of one of ``steps``; one line naming the flag and folder otherwise."""
    if not storage.exists(f"{uri.rstrip('/')}/result.json"):
        raise EupeError(f"{flag} {uri}: no result.json (not a step's output folder)")
    try:
        result = read_result(uri)
    except EupeError as e:
        raise EupeError(f"{flag} {uri}: {e}") from None
    if not isinstance(result, dict) or result.get("step") not in steps:
        got = result.get("step") if isinstance(result, dict) else type(result).__name__
        raise EupeError(f"{flag} {uri}: result.json is from step {got!r}, expected {' or '.join(steps)}")
    return result


def collect(inputs: Any, *, name: str, version: int, uri: str, run_id: str | None, digest: str, files: dict,
            previous: int | None, latency: dict[str, dict]) -> dict[str, Any]:
    """The ``lineage.json`` of a version being published from ``inputs`` (a :class:`eupe.registry.promote.Inputs`):
    data and checkpoint DVC hashes, config, code version, run id, the files with their sha256, and the gated
    numbers (eval metrics, latency medians) for ``eupe lineage``."""
    from eupe.evaluate.gate import gated_values

    timings = {k: {f: r.get(f) for f in ("median_ms", "p90_ms", "budget_ms")} for k, r in latency.items()}
    return {"name": name, "version": version, "uri": uri,
            "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_id": run_id,
            "dataset": inputs.dataset, "checkpoints": inputs.checkpoints, "config": inputs.config,
            "code": code_version(), "previous": previous, "digest": digest, "files": files,
            "inputs": {"encoder": inputs.encoder, "eval": inputs.eval_dir, "export": [f for f, _, _ in inputs.exports],
                       "latency": [d for d, _, _ in inputs.latency]},
            "metrics": {"eval": gated_values(inputs.evaluation),
                        "latency": timings}}


def version_folder(uri: str) -> str:
    """The version folder named by ``uri``: itself, the folder of a ``lineage.json``, or the version a
    ``production.json`` pointer points to."""
    uri = uri.rstrip("/")
    if uri.endswith(POINTER_FILE):
        return read_pointer(uri)["uri"].rstrip("/")
    return uri[: -len(LINEAGE_FILE) - 1] if uri.endswith("/" + LINEAGE_FILE) else uri


def read_lineage(uri: str) -> dict[str, Any]:
    """``lineage.json`` of a complete published version (its ``_SUCCESS`` marker is written after every file)."""
    folder = version_folder(uri)
    if not storage.exists(f"{folder}/{LINEAGE_FILE}"):
        raise EupeError(f"{folder}: no {LINEAGE_FILE} (not a published model version)")
    if not storage.exists(f"{folder}/{storage.SUCCESS_MARKER}"):
        raise EupeError(f"incomplete model version at {folder}: no {storage.SUCCESS_MARKER} marker")
    record = storage.read_json(f"{folder}/{LINEAGE_FILE}")
    if not isinstance(record, dict) or "version" not in record:
        raise EupeError(f"{folder}/{LINEAGE_FILE}: not a lineage record (no 'version')")
    return record


def format_lineage(record: dict[str, Any]) -> list[str]:
    """Readable lines: model and version, dataset, checkpoints, config, code, run id, when, metrics."""
    data = record.get("dataset")
    cfg = record.get("config")
    code = record.get("code") or {}
    commit = code.get("git_commit")
    git = f", git {commit}{' (dirty)' if code.get('git_dirty') else ''}" if commit else ", git: not a checkout"
    lines = [
        f"model         {record.get('name')} version {record.get('version')} ({record.get('uri')})",
        f"promoted_at   {record.get('promoted_at')}",
        f"run_id        {record.get('run_id') or '-'}",
        f"dataset       {data['hash']} ({data.get('path')})" if data else "dataset       - (no --data-version)",
    ]
    checkpoints = record.get("checkpoints") or []
    lines += [f"checkpoint    {c['hash']} ({c.get('path')})" for c in checkpoints] or ["checkpoint    - (none)"]
    if cfg:
        sets = "".join(f" --set {o}" for o in cfg.get("overrides", []))
        lines.append(f"config        {cfg.get('name')} sha256:{cfg.get('sha256')} ({cfg.get('source')}{sets})")
    else:
        lines.append("config        - (no --config)")
    lines.append(f"code          eupe {code.get('eupe')}{git}")
    metrics = (record.get("metrics") or {}).get("eval") or {}
    if metrics:
        lines.append("eval          " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    for name, lat in sorted(((record.get("metrics") or {}).get("latency") or {}).items()):
        lines.append(f"latency       {name}: median {lat.get('median_ms'):.2f} ms (budget {lat.get('budget_ms')} ms)")
    return lines
