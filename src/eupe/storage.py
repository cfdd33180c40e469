"""One URI layer for the pipeline: every step takes a local path or an ``s3://bucket/key`` URI.

S3 access is plain boto3. Endpoint, region and credentials come from the standard AWS
environment variables and config files (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ...), which boto3 resolves itself.

Local writes are atomic (temp file in the same directory, fsync, ``os.replace``) and whole
directories are published with :func:`atomic_dir`, so a reader never sees half a file or half a
checkpoint. Checkpoint prefixes on S3 carry a ``_SUCCESS`` marker written last by
:func:`upload_dir`; :func:`download_dir` refuses a prefix without one.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import weakref
from http.client import IncompleteRead
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from urllib3.exceptions import ProtocolError

from eupe.errors import EupeError

log = logging.getLogger(__name__)
RANGE_RETRIES = 5  # a broken S3 download resumes from the byte it reached this many times in a row

__all__ = [
    "SUCCESS_MARKER",
    "atomic_dir",
    "atomic_write_local",
    "delete",
    "download_dir",
    "entries",
    "exists",
    "inside",
    "is_leftover",
    "is_object",
    "is_s3",
    "list_uris",
    "listing_digest",
    "local_copy",
    "on_first_write",
    "open_read",
    "parse_json",
    "publish_files",
    "read_bytes",
    "read_json",
    "remove_leftovers",
    "s3_digest",
    "split_s3",
    "temp_name",
    "upload_dir",
    "write_bytes",
    "write_json",
]

SUCCESS_MARKER = "_SUCCESS"
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_LIST_PAGE_SIZE = 1000  # keys per list_objects_v2 call (the S3 maximum)

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- URIs and client


def is_s3(uri: PathLike) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def _unsafe_key(key: str) -> bool:
    """A key that would not stay below its bucket as a local path: an empty part (``a//b``, a leading
    ``/``), ``.`` or ``..``. A trailing ``/`` (a prefix) and the empty key (the bucket root) are fine."""
    parts = key.split("/")
    if key.endswith("/"):
        parts = parts[:-1]
    return bool(key) and any(p in ("", ".", "..") for p in parts)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty (a bucket root).
    A key with an empty, ``.`` or ``..`` part is refused: it would name a path outside the bucket's
    folder once copied to local disk."""
    if not is_s3(uri):
        raise EupeError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or any(c in bucket for c in " \\?#"):
        raise EupeError(f"malformed s3 URI: {uri!r} (expected s3://bucket/key)")
    if _unsafe_key(key):
        raise EupeError(f"malformed s3 URI: {uri!r} (an empty, '.' or '..' part in the key)")
    return bucket, key


def inside(path: PathLike, root: PathLike, what: str) -> Path:
    """``path`` resolved, refused (one line naming both) unless it lies below ``root``."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise EupeError(f"refusing to write {what} outside {base}: {path}")
    return resolved


def _object(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise EupeError(f"malformed s3 URI: {uri!r} (names a prefix, not an object)")
    return bucket, key


def _prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key.strip("/") else ""


# A server that accepts connections but never answers (overloaded, frozen, a half-open proxy) fails a call
# after at most attempts x timeout + backoff (defaults: 5 x 30 s + < 16 s), not botocore's 5 x 60 s per call:
# a step fails in bounded time with a retryable exit (1) instead of hanging. A timeout bounds one socket
# connect or read, never a whole transfer. EUPE_S3_CONNECT_TIMEOUT / EUPE_S3_READ_TIMEOUT (seconds) and the
# standard AWS_MAX_ATTEMPTS change them.
S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 5


def _setting(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        raise EupeError(f"{name}: not a number: {os.environ.get(name)!r}") from None
    if value <= 0:
        raise EupeError(f"{name}: must be positive, got {value:g}")
    return value


@functools.lru_cache(maxsize=8)
def _client_for(endpoint: str | None, endpoint_s3: str | None, pid: int, timeouts: tuple[float, float, int]) -> Any:
    # A fresh Session re-reads the environment; the default session would cache credentials.
    connect, read, attempts = timeouts
    config = Config(connect_timeout=connect, read_timeout=read,
                    retries={"mode": "standard", "max_attempts": attempts})
    return boto3.session.Session().client("s3", config=config)


def _client() -> Any:
    """The S3 client of this process, rebuilt when the endpoint or timeout env vars change (tests) or after a fork."""
    timeouts = (_setting("EUPE_S3_CONNECT_TIMEOUT", S3_CONNECT_TIMEOUT_S),
                _setting("EUPE_S3_READ_TIMEOUT", S3_READ_TIMEOUT_S),
                int(_setting("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)))
    return _client_for(
        os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"), os.getpid(), timeouts
    )


class S3Unavailable(EupeError):
    """The S3 endpoint did not answer (connection refused or reset, a connect or read timeout) after every
    retry: one line as any error, but exit 1, which orchestrators retry; the input itself may be fine."""

    exit_code = 1


def _unavailable(exc: BaseException | None) -> bool:
    """A transport failure (no answer), here or in what it wraps (boto3's transfer errors)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _s3_error(action: str, uri: str, exc: Exception) -> EupeError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "error")
        reason = {"404": "not found (404)", "403": "AccessDenied (403)"}.get(code, code)
    else:
        reason = f"{type(exc).__name__}: {exc}"
    kind = S3Unavailable if _unavailable(exc) else EupeError
    return kind(f"cannot {action} {uri}: {' '.join(reason.split())}")


def _is_not_found(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND


# --------------------------------------------------------------------------- first write under a folder

# root (local absolute path or s3:// prefix, no trailing slash) -> what to call before the first write of this
# module below it. A step claims the --out it creates this way (eupe.step): whichever of its writes comes
# first (a staged output, a checkpoint, result.json), the claim is written before it.
_FIRST_WRITE: dict[str, weakref.WeakMethod] = {}


def _root(uri: PathLike) -> str:
    return str(uri).rstrip("/") if is_s3(uri) else os.path.abspath(uri)


def on_first_write(root: PathLike, callback: Any) -> None:
    """Call the bound method ``callback`` once, before this module first writes below ``root`` (a later
    registration for the same root replaces it; nothing is called once its object is gone)."""
    _FIRST_WRITE[_root(root)] = weakref.WeakMethod(callback)


def _writing(target: PathLike) -> None:
    if not _FIRST_WRITE:
        return
    t = _root(target)
    for root in [r for r in _FIRST_WRITE if t == r or t.startswith(r + "/")]:
        callback = _FIRST_WRITE.pop(root)()
        if callback is not None:
            callback()


# --------------------------------------------------------------------------- local atomic writes


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_local(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """``data`` to a temporary file in ``tmp_dir`` (default: beside ``path``; on the same filesystem), flushed
    to disk, then renamed onto ``path``."""
    _writing(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.tmp-")
    except OSError as e:
        raise EupeError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise EupeError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(path.parent)


# The temporary names this module (and eupe.step) writes under: ``<name>.<kind>-<pid>-<8 hex>`` for folders
# (atomic_dir, publish_files, a step's staging folder) and ``.<name>.tmp-<8 of [a-z0-9_]>`` (mkstemp) for files.
_TEMP_NAME = re.compile(r"\.(tmp|old|staging)-(\d+)-[0-9a-f]{8}$")
_TEMP_FILE = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")


def temp_name(name: str, kind: str) -> str:
    """``<name>.<kind>-<pid>-<random>``: a temporary sibling of ``name`` that :func:`is_leftover` knows."""
    return f"{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def is_leftover(name: str) -> bool:
    """A temporary name of this module's writers: a half-written file or folder once its writer is gone."""
    return bool(_TEMP_NAME.search(name) or _TEMP_FILE.match(name))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(root: PathLike) -> list[str]:
    """Delete every temporary file or folder (:func:`is_leftover`) under the local folder ``root``, at
    any depth: what a killed writer left. Only for a folder its caller owns (a step's ``--out``), where
    no other writer is running. Returns the paths removed."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [d for d in dirs if is_leftover(d)] + [f for f in files if is_leftover(f)]:
            _remove(Path(folder) / name)
            removed.append(os.path.join(folder, name))
        dirs[:] = [d for d in dirs if not is_leftover(d)]
    if removed:
        log.info("removed %d leftovers of a killed run under %s: %s", len(removed), root, ", ".join(removed[:3]))
    return removed


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def _remove_dead_siblings(final: Path) -> None:
    """The ``.tmp-``/``.old-`` siblings of ``final`` whose writing process is gone (killed mid-write)."""
    try:
        siblings = [p for p in final.parent.iterdir() if p.name.startswith(f"{final.name}.")]
    except OSError:
        return
    for p in siblings:
        m = _TEMP_NAME.search(p.name)
        if m and p.name == f"{final.name}{m.group(0)}" and m.group(1) != "staging" and _dead(int(m.group(2))):
            _remove(p)


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``
    (replacing an existing directory), on an exception it is removed. Siblings left by a writer
    that was killed (its process is gone) are removed first."""
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise EupeError(f"not a directory: {final}")
    _writing(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(final)
    tmp = final.with_name(temp_name(final.name, "tmp"))
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(temp_name(final.name, "old"))
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- files


def exists(uri: PathLike) -> bool:
    """True for an existing local file/directory, S3 object, or non-empty S3 prefix."""
    if not is_s3(uri):
        return Path(uri).exists()
    if is_object(uri):  # an object itself, else a prefix with something under it
        return True
    bucket, key = split_s3(str(uri))
    try:
        resp = _client().list_objects_v2(Bucket=bucket, Prefix=_prefix(key), MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    except ClientError as e:
        if _is_not_found(e):
            return False
        raise _s3_error("read", str(uri), e) from e
    except BotoCoreError as e:
        raise _s3_error("read", str(uri), e) from e


def is_object(uri: PathLike) -> bool:
    """True for an existing local file (not a folder) or S3 object (not a mere prefix)."""
    if not is_s3(uri):
        return Path(uri).exists() and not Path(uri).is_dir()
    bucket, key = split_s3(str(uri))
    if not key or key.endswith("/"):
        return False
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if _is_not_found(e):
            return False
        raise _s3_error("read", str(uri), e) from e
    except BotoCoreError as e:
        raise _s3_error("read", str(uri), e) from e


def entries(uri: PathLike, limit: int = 10) -> list[str]:
    """Up to ``limit`` names directly under a local folder or S3 prefix (files and sub-folders), leaving
    out :func:`is_leftover` names; ``[]`` when there is nothing there."""
    if not is_s3(uri):
        try:
            with os.scandir(uri) as it:
                names = (e.name for e in it if not is_leftover(e.name))
                return sorted(n for _, n in zip(range(limit), names))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise EupeError(f"cannot list {uri}: {e.strerror or e}") from e
    bucket, key = split_s3(str(uri))
    prefix = _prefix(key)
    try:
        resp = _client().list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=limit + 1)
    except ClientError as e:
        if _is_not_found(e):
            return []
        raise _s3_error("list", str(uri), e) from e
    except BotoCoreError as e:
        raise _s3_error("list", str(uri), e) from e
    names = [c["Prefix"][len(prefix) :].rstrip("/") for c in resp.get("CommonPrefixes", [])]
    names += [o["Key"][len(prefix) :] for o in resp.get("Contents", [])]
    return sorted(n for n in names if n and not is_leftover(n))[:limit]


def read_bytes(uri: PathLike) -> bytes:
    if is_s3(uri):
        bucket, key = _object(str(uri))
        try:
            return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as e:
            raise _s3_error("read", str(uri), e) from e
    path = Path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise EupeError(f"file not found: {uri}") from e
    except OSError as e:
        raise EupeError(f"cannot read {uri}: {e.strerror or e}") from e


@contextmanager
def open_read(uri: PathLike) -> Iterator[BinaryIO]:
    """A sequential binary reader over a local file or an S3 object (boto3's streaming body), so a
    large object (a .tar shard) is read in constant memory. Errors name ``uri``."""
    if not is_s3(uri):
        try:
            f = open(uri, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as e:
            raise EupeError(f"file not found: {uri}") from e
        except OSError as e:
            raise EupeError(f"cannot read {uri}: {e.strerror or e}") from e
        with f:
            yield f
        return
    body = RangeResumingBody(str(uri))
    try:
        yield io.BufferedReader(body, buffer_size=1 << 20)
    finally:
        body.close()


class RangeResumingBody(io.RawIOBase):
    """An S3 object read front to back; a connection that breaks mid-way (reset, timeout, truncated body) is
    reopened from the byte reached with an HTTP ``Range`` request (``If-Match`` its ETag, so a changed object
    fails instead of mixing versions), up to ``RANGE_RETRIES`` times in a row with back-off."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri, (self.bucket, self.key) = uri, _object(uri)
        self.pos, self.etag, self.size, self.body, self.resumed = 0, None, None, None, 0
        self._open()

    def _open(self) -> None:
        extra = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag} if self.pos else {}
        try:
            response = _client().get_object(Bucket=self.bucket, Key=self.key, **extra)
        except (ClientError, BotoCoreError) as e:
            raise _s3_error("read", self.uri, e) from e
        self.etag = self.etag or response.get("ETag")
        if self.size is None:
            self.size = int(response.get("ContentLength", 0))
        self.body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failures = 0
        while True:
            try:
                data = self.body.read(len(buffer)) if self.pos < (self.size or 0) else b""
                if not data and self.size is not None and self.pos < self.size:
                    raise IncompleteRead(f"{self.uri}: the connection ended at byte {self.pos} of {self.size}")
                buffer[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except (BotoCoreError, OSError, IncompleteRead, ProtocolError) as e:
                failures += 1
                if failures > RANGE_RETRIES:  # the network, not the input: exit 1, retried
                    raise S3Unavailable(f"cannot read {self.uri}: the download broke at byte {self.pos} "
                                        f"{failures} times ({type(e).__name__})") from e
                log.warning("%s: download broke at byte %d (%s); resuming from there", self.uri, self.pos,
                            type(e).__name__)
                time.sleep(min(2.0 ** (failures - 1) * 0.2, 5.0))
                self.body.close()
                self._open()
                self.resumed += 1

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def write_bytes(uri: PathLike, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = _object(str(uri))
        _writing(uri)
        try:
            _client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as e:
            raise _s3_error("write", str(uri), e) from e
    else:
        atomic_write_local(Path(uri), data)


def parse_json(data: bytes | str, uri: PathLike) -> Any:
    """``data`` (the content of ``uri``) as JSON; text that is not JSON, or not text at all, is one line
    naming ``uri``."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise EupeError(f"invalid JSON in {uri}: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise EupeError(f"invalid JSON in {uri}: not UTF-8 text ({e.reason} at byte {e.start}): a binary file?") from None
    except (ValueError, RecursionError) as e:
        raise EupeError(f"invalid JSON in {uri}: {type(e).__name__}") from None


def read_json(uri: PathLike) -> Any:
    return parse_json(read_bytes(uri), uri)


def write_json(uri: PathLike, obj: Any) -> None:
    # Serialise first: a failure here never touches the destination.
    write_bytes(uri, (json.dumps(obj, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- paths relative to the file naming them


def relative_to(uri: PathLike, folder: PathLike) -> str:
    """``uri`` as written in a file that lives in ``folder``: relative to that folder (a local path, or an S3 key
    under the folder's prefix), so a run folder copied or mounted elsewhere still names its own files; an S3 URI
    outside the prefix, or a local path next to an S3 folder, stays absolute."""
    uri, folder = str(uri), str(folder).rstrip("/")
    if is_s3(uri) or is_s3(folder):
        return uri[len(folder) + 1:] if is_s3(uri) and uri.startswith(folder + "/") else uri
    return os.path.relpath(os.path.abspath(uri), os.path.abspath(folder or "."))


def resolve_from(path: PathLike, folder: PathLike) -> str:
    """The inverse of :func:`relative_to`: a path read from a file in ``folder``, as a usable URI (absolute
    paths and ``s3://`` URIs pass through unchanged)."""
    path, folder = str(path), str(folder).rstrip("/")
    if is_s3(path) or os.path.isabs(path):
        return path
    if is_s3(folder):
        return f"{folder}/{path}"
    return os.path.normpath(os.path.join(os.path.abspath(folder or "."), path))


def read_result(folder: PathLike) -> dict:
    """A step's ``result.json`` with its ``artifacts`` resolved against the folder it lives in."""
    result = read_json(f"{str(folder).rstrip('/')}/result.json")
    if isinstance(result, dict) and isinstance(result.get("artifacts"), dict):
        result["artifacts"] = {k: resolve_from(v, folder) if isinstance(v, str) else v
                               for k, v in result["artifacts"].items()}
    return result


# --------------------------------------------------------------------------- cache


def _cache_root(cache_dir: PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("EUPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "eupe"


def local_copy(uri: PathLike, cache_dir: PathLike | None = None) -> Path:
    """A local path holding the content of ``uri``.

    Local paths are returned as they are. S3 objects are cached under
    ``<cache_dir or $EUPE_CACHE or ~/.cache/eupe>/s3/<bucket>/<key>``; the download is skipped
    when the cached file has the size and ETag recorded in its ``.etag`` sidecar and the object's
    ETag is unchanged (one conditional GET answered 304).
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise EupeError(f"file not found: {uri}")
        return path
    uri = str(uri)
    bucket, key = _object(uri)
    root = _cache_root(cache_dir)
    dest = inside(root / "s3" / bucket / key, root, f"the cached copy of {uri}")
    sidecar = dest.with_name(dest.name + ".etag")
    cached: dict[str, Any] = {}
    try:
        cached = json.loads(sidecar.read_text())
        if dest.stat().st_size != cached.get("size"):
            cached = {}
    except (OSError, ValueError):
        cached = {}

    client = _client()
    try:
        kwargs = {"IfNoneMatch": cached["etag"]} if cached.get("etag") else {}
        resp = client.get_object(Bucket=bucket, Key=key, **kwargs)
    except ClientError as e:
        if cached and str(e.response.get("Error", {}).get("Code")) == "304":
            return dest
        raise _s3_error("read", uri, e) from e
    except BotoCoreError as e:
        raise _s3_error("read", uri, e) from e

    dest.parent.mkdir(parents=True, exist_ok=True)
    sidecar.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in resp["Body"].iter_chunks(chunk_size=1 << 20):
                f.write(chunk)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (ClientError, BotoCoreError)):
            raise _s3_error("read", uri, e) from e
        raise
    atomic_write_local(
        sidecar, json.dumps({"etag": resp["ETag"], "size": dest.stat().st_size}).encode()
    )
    return dest


# --------------------------------------------------------------------------- directories


def _local_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _s3_keys(bucket: str, prefix: str, uri: str) -> list[str]:
    keys: list[str] = []
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": _LIST_PAGE_SIZE}
        )
        for page in pages:
            keys.extend(o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    except (ClientError, BotoCoreError) as e:
        raise _s3_error("list", uri, e) from e
    unsafe = [k for k in keys if _unsafe_key(k)]
    if unsafe:  # never an s3:// URI of ours, never a local path: left out of every listing
        log.warning("ignoring %d objects under s3://%s/%s with an empty, '.' or '..' part in the key, e.g. %r",
                    len(unsafe), bucket, prefix, unsafe[0])
        keys = [k for k in keys if not _unsafe_key(k)]
    return sorted(keys)


def list_uris(uri: PathLike, suffixes: Iterable[str] | None = None) -> list[str]:
    """Sorted recursive listing of the files under a local directory or S3 prefix,
    optionally only those whose lower-cased name ends with one of ``suffixes``."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        found = [f"s3://{bucket}/{k}" for k in _s3_keys(bucket, _prefix(key), str(uri))]
    else:
        root = Path(uri)
        if root.is_file():
            found = [str(root)]
        elif root.is_dir():
            found = [str(p) for p in _local_files(root)]
        else:
            raise EupeError(f"directory not found: {uri}")
    if suffixes is not None:
        wanted = tuple(s.lower() for s in suffixes)
        found = [u for u in found if u.lower().endswith(wanted)]
    return sorted(found)


def upload_dir(local_dir: PathLike, uri: PathLike) -> None:
    """Copy every file under ``local_dir`` to the prefix ``uri`` and write ``<uri>/_SUCCESS`` last.

    A previous marker is removed first and objects left from an earlier upload are deleted, so
    the prefix only ever looks complete when it holds exactly this directory. A local ``uri`` is
    published with :func:`atomic_dir` instead.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise EupeError(f"directory not found: {local_dir}")
    files = [p for p in _local_files(src) if p.relative_to(src).as_posix() != SUCCESS_MARKER]
    if not is_s3(uri):
        with atomic_dir(uri) as tmp:
            for p in files:
                (tmp / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / p.relative_to(src))
            (tmp / SUCCESS_MARKER).write_bytes(b"")
        return
    uri = str(uri)
    bucket, key = split_s3(uri)
    prefix = _prefix(key)
    if not prefix:
        raise EupeError(f"malformed s3 URI: {uri!r} (upload_dir needs a prefix below the bucket)")
    client = _client()
    _writing(uri)
    previous = set(_s3_keys(bucket, prefix, uri))
    try:
        if prefix + SUCCESS_MARKER in previous:
            client.delete_object(Bucket=bucket, Key=prefix + SUCCESS_MARKER)
        uploaded = set()
        for p in files:
            k = prefix + p.relative_to(src).as_posix()
            client.upload_file(str(p), bucket, k)
            uploaded.add(k)
        stale = sorted(previous - uploaded - {prefix + SUCCESS_MARKER})
        for i in range(0, len(stale), 1000):
            batch = [{"Key": k} for k in stale[i : i + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        client.put_object(Bucket=bucket, Key=prefix + SUCCESS_MARKER, Body=b"")
    except (ClientError, BotoCoreError, S3UploadFailedError) as e:
        raise _s3_error("write", uri, e) from e


def download_dir(uri: PathLike, local_dir: PathLike) -> Path:
    """Fetch a prefix written by :func:`upload_dir` into ``local_dir`` (replaced atomically).

    Refuses a prefix without ``_SUCCESS``. The marker itself is not copied.
    """
    if not is_s3(uri):
        src = Path(uri)
        if not (src / SUCCESS_MARKER).is_file():
            raise EupeError(f"incomplete upload at {uri}: no {SUCCESS_MARKER} marker")
        with atomic_dir(local_dir) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            (tmp / SUCCESS_MARKER).unlink()
        return Path(local_dir)
    uri = str(uri)
    bucket, key = split_s3(uri)
    prefix = _prefix(key)
    keys = _s3_keys(bucket, prefix, uri)
    if prefix + SUCCESS_MARKER not in keys:
        raise EupeError(f"incomplete upload at {uri}: no {SUCCESS_MARKER} marker")
    client = _client()
    with atomic_dir(local_dir) as tmp:
        for k in keys:
            rel = k[len(prefix) :]
            if rel == SUCCESS_MARKER:
                continue
            target = inside(tmp / rel, tmp, f"s3://{bucket}/{k}")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(bucket, k, str(target))
            except (ClientError, BotoCoreError, S3TransferFailedError) as e:
                raise _s3_error("read", f"s3://{bucket}/{k}", e) from e
    return Path(local_dir)


# --------------------------------------------------------------------------- step outputs


def listing_digest(rows: list[tuple]) -> str:
    """``listing:<sha256>`` of a folder's or prefix's (name, size, version) rows, in any order."""
    import hashlib

    return "listing:" + hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def s3_digest(uri: str, max_keys: int) -> str:
    """ETag of an S3 object, or a digest of the keys, sizes and ETags under an S3 prefix (of at most
    ``max_keys`` objects: a larger prefix is identified by its URI)."""
    bucket, key = split_s3(uri)
    client = _client()
    try:
        if key and not key.endswith("/"):
            try:
                return "etag:" + client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
            except ClientError as e:
                if not _is_not_found(e):
                    raise
        rows = []
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_prefix(key))
        for page in pages:
            rows += [(o["Key"], o["Size"], o["ETag"].strip('"')) for o in page.get("Contents", [])]
            if len(rows) > max_keys:
                return f"unlisted:>{max_keys} objects"
    except (ClientError, BotoCoreError) as e:
        raise _s3_error("read", uri, e) from e
    if not rows:
        raise EupeError(f"input not found: {uri}")
    return listing_digest(rows)


def delete(uri: PathLike) -> None:
    """Remove one file or S3 object if it is there."""
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    bucket, key = _object(str(uri))
    try:
        _client().delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as e:
        raise _s3_error("delete", str(uri), e) from e


def publish_files(staged: PathLike, uri: PathLike) -> list[str]:
    """Move every entry of the local folder ``staged`` to the same name under ``uri`` and return the names.

    Only those names are replaced (a file by ``os.replace``, a folder by a rename of the old one aside
    first); nothing else under ``uri`` is touched. On S3 every file is uploaded under the prefix.
    """
    src = Path(staged)
    names = sorted(p.name for p in src.iterdir())
    _writing(uri)
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        prefix = _prefix(key)
        client = _client()
        try:
            for p in _local_files(src):
                client.upload_file(str(p), bucket, prefix + p.relative_to(src).as_posix())
        except (ClientError, BotoCoreError, S3UploadFailedError) as e:
            raise _s3_error("write", str(uri), e) from e
        return names
    final = Path(uri)
    final.mkdir(parents=True, exist_ok=True)
    for name in names:
        new, dest = src / name, final / name
        if new.is_dir() and dest.exists():
            old = final / ("." + temp_name(name, "old"))
            os.rename(dest, old)
            os.rename(new, dest)
            shutil.rmtree(old, ignore_errors=True)
        elif dest.is_dir():
            raise EupeError(f"cannot publish file {name}: {dest} is a folder")
        else:
            os.replace(new, dest)
    _fsync_dir(final)
    return names
