"""``eupe data scan``: one Parquet row per image of a source, streamed with constant memory.

Columns: ``uri, bytes, sha256, width, height, mode, format, decodable, error``, the per-channel
``mean_r .. std_b`` of the RGB-converted image in [0, 1], and ``label`` / ``domain`` when the source
knows them. Every image goes through :func:`eupe.data.decode.decode_full`, the decoder training uses,
so "decodable" here means "trainable". A file that cannot be read or decoded is a row with
``decodable = False`` and its reason in ``error``, never a crash of the scan.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import ImageStat

from eupe import storage
from eupe.data.decode import DEFAULT_MAX_PIXELS, UndecodableImage, decode_full
from eupe.data.folder import ImageSource
from eupe.errors import EupeError

__all__ = ["MANIFEST_FILE", "SCHEMA", "STAT_COLUMNS", "describe", "describe_bytes", "open_dataset",
           "read_manifest", "run_scan", "scan_rows", "write_manifest"]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
STAT_COLUMNS = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")
SCHEMA = pa.schema(
    [("uri", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()), ("width", pa.int32()),
     ("height", pa.int32()), ("mode", pa.string()), ("format", pa.string()), ("decodable", pa.bool_()),
     ("error", pa.string()), *[(c, pa.float64()) for c in STAT_COLUMNS], ("label", pa.string()),
     ("domain", pa.string())]
)


def _label_name(classes: list[str], label: int) -> str | None:
    if 0 <= label < len(classes):
        return classes[label]
    return str(label) if label >= 0 else None  # a shard's numeric .cls without class names


def describe_bytes(uri: str, data: bytes, label: str | None = None, domain: str | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """The manifest row of one file's bytes; a decode failure is recorded in ``error``, not raised."""
    row: dict[str, Any] = {"uri": uri, "decodable": False, "label": label, "domain": domain,
                           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    try:
        decoded = decode_full(data, uri, max_pixels)
    except UndecodableImage as e:
        row["error"] = e.reason
        return row
    stat = ImageStat.Stat(decoded.image)  # from the per-band histograms: exact, constant memory
    row.update(decodable=True, width=decoded.image.width, height=decoded.image.height, mode=decoded.mode,
               format=decoded.format,
               **{f"mean_{c}": m / 255.0 for c, m in zip("rgb", stat.mean)},
               **{f"std_{c}": s / 255.0 for c, s in zip("rgb", stat.stddev)})
    return row


def describe(source: ImageSource, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """The manifest row of image ``index``; read and decode failures are recorded, not raised."""
    uri = source.uri(index)
    label, domain = _label_name(source.classes, source.label(index)), source.domain(index)
    try:
        data = source.read_bytes(index)
    except Exception as e:  # noqa: BLE001 - one unreadable object (404, 403, I/O error) is a bad file, not a crash
        return {"uri": uri, "decodable": False, "label": label, "domain": domain,
                "error": " ".join(f"unreadable: {e}".split())[:300]}
    return describe_bytes(uri, data, label, domain, max_pixels)


def _tasks(source: Any, max_pixels: int) -> Iterator[tuple[Any, tuple]]:
    """``(function, args)`` per image: map-style sources read in the workers; a stream of ``.tar``
    shards is read sequentially here (one sample in memory each) and only decoded in the workers."""
    if hasattr(source, "read_bytes") and hasattr(source, "__len__"):
        for i in range(len(source)):
            yield describe, (source, i, max_pixels)
        return
    from eupe.data.sources import iter_records  # shards; raises for an endless mixture

    classes = getattr(source, "classes", [])
    for rec in iter_records(source):
        if rec.skipped:  # not read (too large, named outside its shard): a bad file with its reason
            yield _skipped_row, (rec.uri, rec.skipped, _label_name(classes, rec.label), rec.domain)
        else:
            yield describe_bytes, (rec.uri, rec.data, _label_name(classes, rec.label), rec.domain, max_pixels)


def _skipped_row(uri: str, reason: str, label: str | None, domain: str | None) -> dict[str, Any]:
    return {"uri": uri, "decodable": False, "label": label, "domain": domain, "error": reason}


def scan_rows(source: Any, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict[str, Any]]:
    """Rows in source order, ``workers`` threads decoding ahead (PIL and hashlib release the GIL);
    at most ``2 * workers`` images are in memory at any time."""
    window = 2 * max(1, workers)
    tasks = _tasks(source, max_pixels)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="scan") as pool:
        pending: deque = deque()
        for fn, args in tasks:
            pending.append(pool.submit(fn, *args))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_manifest(source: Any, path: str | Path, workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS,
                   batch_rows: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Scan ``source`` (an ``ImageSource``, or a ``ShardStream`` of ``.tar`` shards) into the Parquet file
    ``path`` (written to a temporary name, then renamed).
    Returns counts: ``images``, ``decodable``, ``undecodable``, ``bytes``."""
    from eupe.progress import progress as bar

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")  # same folder: rename is atomic
    counts = {"images": 0, "decodable": 0, "undecodable": 0, "bytes": 0}
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            batch: list[dict[str, Any]] = []
            total = len(source) if hasattr(source, "__len__") else None  # shards: counted as they stream
            rows = bar(scan_rows(source, workers, max_pixels), total=total, desc="scan", unit="img",
                       disable=not progress)
            for row in rows:
                batch.append(row)
                counts["images"] += 1
                counts["decodable" if row["decodable"] else "undecodable"] += 1
                counts["bytes"] += row.get("bytes") or 0
                if len(batch) >= batch_rows:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                    batch.clear()
            writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))  # also gives an empty source its schema
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    logger.info("scan: %d images (%d undecodable) -> %s", counts["images"], counts["undecodable"], path)
    return counts


def read_manifest(uri: str | Path):  # -> pandas.DataFrame
    """A manifest written by :func:`write_manifest`, from a local path or ``s3://``."""
    import pandas as pd  # noqa: F401 - pyarrow's to_pandas needs it

    path = storage.local_copy(str(uri))
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise EupeError(f"cannot read manifest {uri}: {' '.join(str(e).split())}") from None
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise EupeError(f"manifest {uri}: missing columns {missing}")
    return table.to_pandas()


def open_dataset(data: str) -> Any:
    """The source at ``data`` for a scan; an empty dataset is an error naming it."""
    from eupe.data.folder import open_source

    source = open_source(data)
    if hasattr(source, "__len__") and len(source) == 0:
        raise EupeError(f"no images in {data}")
    return source


def run_scan(cfg, data: str, out: str | Path, workers: int | None = None) -> dict[str, Any]:
    """``eupe data scan``: ``out/manifest.parquet`` and ``out/result.json`` for the dataset at ``data``."""
    import time

    from eupe.fingerprint import fingerprint
    from eupe.step import StepRun

    start = time.perf_counter()
    source = open_dataset(data)  # bad input fails here, before anything under ``out`` is touched

    def check() -> None:  # .tar shards that hold no sample fail before --out (an earlier scan there) is touched
        if not hasattr(source, "__len__"):
            from eupe.data.sources import iter_records

            records = iter_records(source)
            try:
                if next(records, None) is None:
                    raise EupeError(f"no images in {data}: its .tar shards hold no sample")
            finally:
                records.close()

    run = StepRun(out, "data-scan", fingerprint("data-scan", {"data": data}, max_pixels=cfg.validation.max_pixels),
                  check=check)
    if run.done:
        return run.done
    with run.staging() as tmp:
        counts = write_manifest(source, tmp / MANIFEST_FILE, workers=workers or os.cpu_count() or 1,
                                max_pixels=cfg.validation.max_pixels)
        if counts["images"] == 0:  # shards that hold no sample
            raise EupeError(f"no images in {data}")
    wall = time.perf_counter() - start
    metrics = {**counts, "wall_s": round(wall, 3), "images_per_s": round(counts["images"] / max(wall, 1e-9), 2)}
    return run.finish(metrics, {"manifest": run.path(MANIFEST_FILE)})
