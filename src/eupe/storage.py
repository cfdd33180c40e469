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
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from eupe.errors import EupeError

__all__ = [
    "SUCCESS_MARKER",
    "atomic_dir",
    "delete",
    "download_dir",
    "exists",
    "is_s3",
    "list_uris",
    "listing_digest",
    "local_copy",
    "open_read",
    "publish_files",
    "read_bytes",
    "read_json",
    "s3_digest",
    "split_s3",
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


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty (a bucket root)."""
    if not is_s3(uri):
        raise EupeError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or any(c in bucket for c in " \\?#") or ".." in PurePosixPath(key).parts:
        raise EupeError(f"malformed s3 URI: {uri!r} (expected s3://bucket/key)")
    return bucket, key


def _object(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise EupeError(f"malformed s3 URI: {uri!r} (names a prefix, not an object)")
    return bucket, key


def _prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key.strip("/") else ""


@functools.lru_cache(maxsize=8)
def _client_for(endpoint: str | None, endpoint_s3: str | None, pid: int) -> Any:
    # A fresh Session re-reads the environment; the default session would cache credentials.
    config = Config(retries={"mode": "standard", "max_attempts": 5})
    return boto3.session.Session().client("s3", config=config)


def _client() -> Any:
    """The S3 client of this process, rebuilt when the endpoint env vars change (tests) or after a fork."""
    return _client_for(
        os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"), os.getpid()
    )


def _s3_error(action: str, uri: str, exc: Exception) -> EupeError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "error")
        reason = {"404": "not found (404)", "403": "AccessDenied (403)"}.get(code, code)
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return EupeError(f"cannot {action} {uri}: {' '.join(reason.split())}")


def _is_not_found(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND


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


def _atomic_write_local(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
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


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``
    (replacing an existing directory), on an exception it is removed."""
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise EupeError(f"not a directory: {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
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
    bucket, key = split_s3(str(uri))
    client = _client()
    try:
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as e:
                if not _is_not_found(e):
                    raise
        resp = client.list_objects_v2(Bucket=bucket, Prefix=_prefix(key), MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    except ClientError as e:
        if _is_not_found(e):
            return False
        raise _s3_error("read", str(uri), e) from e
    except BotoCoreError as e:
        raise _s3_error("read", str(uri), e) from e


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
    bucket, key = _object(str(uri))
    try:
        body = _client().get_object(Bucket=bucket, Key=key)["Body"]
    except (ClientError, BotoCoreError) as e:
        raise _s3_error("read", str(uri), e) from e
    try:
        yield body
    finally:
        body.close()


def write_bytes(uri: PathLike, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = _object(str(uri))
        try:
            _client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as e:
            raise _s3_error("write", str(uri), e) from e
    else:
        _atomic_write_local(Path(uri), data)


def read_json(uri: PathLike) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as e:
        raise EupeError(f"invalid JSON in {uri}: {e.msg} at line {e.lineno} column {e.colno}") from e


def write_json(uri: PathLike, obj: Any) -> None:
    # Serialise first: a failure here never touches the destination.
    write_bytes(uri, (json.dumps(obj, indent=2) + "\n").encode())


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
    dest = _cache_root(cache_dir) / "s3" / bucket / key
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
    _atomic_write_local(
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
            if ".." in PurePosixPath(rel).parts:
                raise EupeError(f"refusing object outside the prefix: s3://{bucket}/{k}")
            target = tmp / rel
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
            old = final / f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(dest, old)
            os.rename(new, dest)
            shutil.rmtree(old, ignore_errors=True)
        elif dest.is_dir():
            raise EupeError(f"cannot publish file {name}: {dest} is a folder")
        else:
            os.replace(new, dest)
    _fsync_dir(final)
    return names
