"""What a step's result depends on: its input URIs with their content digests, the resolved config and
the code. ``result.json`` records it; a rerun with the same fingerprint is a no-op ("up to date").

Digests are cheap enough to take at every start: a local file is hashed (sha256), a local folder is
summarised by its listing (relative path, size, modification time) as ``make`` would judge it, an S3
object by its ETag and an S3 prefix by the listing of keys, sizes and ETags.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import eupe
from eupe import storage
from eupe.errors import EupeError

_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


MAX_LISTED = 200_000  # a larger folder (a web-scale dataset) is identified by its URI: version it with DVC


def digest(uri: str) -> str:
    """A digest of the content behind ``uri`` (file or folder, local or S3); one line when it is missing."""
    if uri == "hub":  # timm's pretrained weights from the hub cache: named, not hashed
        return "hub"
    if storage.is_s3(uri):
        return storage.s3_digest(uri, MAX_LISTED)
    path = Path(uri)
    if path.is_file():
        return "sha256:" + _sha256_file(path)
    if path.is_dir():
        rows = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # .dvc caches, staging folders
            for name in files:
                if name.startswith("."):
                    continue
                p = Path(root) / name
                st = p.stat()
                rows.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
                if len(rows) > MAX_LISTED:
                    return f"unlisted:>{MAX_LISTED} files"
        return storage.listing_digest(rows)
    raise EupeError(f"input not found: {uri}")


def data_inputs(data: Any) -> dict[str, str]:
    """The dataset URIs of a ``data`` config section: its mixture sources, or its root."""
    if data.sources:
        return {f"data.sources.{i}": s.uri for i, s in enumerate(data.sources)}
    return {"data": str(data.root)}


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """``eupe`` version and a digest of its own source files: any code change reruns the steps."""
    root = Path(eupe.__file__).resolve().parent
    h = hashlib.sha256(eupe.__version__.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return f"{eupe.__version__}+{h.hexdigest()[:16]}"


def fingerprint(step: str, inputs: dict[str, str | None], config: Any = None, **settings: Any) -> dict:
    """``{"step", "inputs": {name: {"uri", "digest"}}, "config": sha256 of the resolved config, "code", ...}``.
    ``settings`` are the step's own arguments that change its output (a stage number, a resolution)."""
    record: dict[str, Any] = {"step": step, "code": code_digest()}
    record["inputs"] = {}
    for name, uri in sorted(inputs.items()):
        if uri in (None, ""):
            continue
        try:
            record["inputs"][name] = {"uri": str(uri), "digest": digest(str(uri))}
        except EupeError as e:
            raise EupeError(f"{name}: {e}") from None
    if config is not None:
        from eupe.config import dump_config

        record["config"] = hashlib.sha256(dump_config(config).encode()).hexdigest()
    record.update({k: v for k, v in sorted(settings.items())})
    return json.loads(json.dumps(record, default=str))  # as it reads back from result.json
