"""Nothing escapes its folder: S3 keys with an empty, ``.`` or ``..`` part are refused (as URIs) or left
out (as listed objects), and every local copy lands inside its cache or target folder. Hostile keys are
put on a real moto_server with a plain boto3 client, as anyone with write access to the bucket could."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from eupe import storage
from eupe.errors import EupeError


def _put(bucket: str, key: str, body: bytes) -> None:
    boto3.session.Session().client("s3").put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.parametrize("uri", ["s3://bucket//tmp/x", "s3://b/a/../../x", "s3://b/a/./x", "s3://b/a//b",
                                 "s3://b/..", "s3://b//"])
def test_split_s3_refuses_keys_that_leave_the_bucket_in_one_line(uri: str) -> None:
    with pytest.raises(EupeError) as err:
        storage.split_s3(uri)
    assert str(err.value) == f"malformed s3 URI: {uri!r} (an empty, '.' or '..' part in the key)"


def test_split_s3_keeps_prefixes_and_the_bucket_root() -> None:
    assert storage.split_s3("s3://b/a/b/") == ("b", "a/b/")
    assert storage.split_s3("s3://b/") == ("b", "")
    assert storage.split_s3("s3://b/a.b/..c/x..y") == ("b", "a.b/..c/x..y")


def test_local_copy_of_an_absolute_key_writes_nothing_outside_the_cache(s3_bucket: str, tmp_path: Path) -> None:
    target = tmp_path / "outside" / "escape.bin"  # where s3://bucket//<abs path> pointed on local disk
    _put(s3_bucket, str(target), b"owned")
    with pytest.raises(EupeError, match=r"malformed s3 URI: .* part in the key"):
        storage.local_copy(f"s3://{s3_bucket}/{target}", cache_dir=tmp_path / "cache")
    assert not target.exists() and not (tmp_path / "outside").exists()


def test_download_dir_leaves_out_objects_whose_keys_would_escape(s3_bucket: str, tmp_path: Path) -> None:
    escape = tmp_path / "outside" / "escape.bin"
    _put(s3_bucket, "ckpt/model.bin", b"weights")
    _put(s3_bucket, f"ckpt/{escape}", b"owned")  # ckpt//tmp/.../escape.bin: "/tmp/..." below the prefix
    _put(s3_bucket, "ckpt/a/../../../escape2.bin", b"owned")
    _put(s3_bucket, "ckpt/_SUCCESS", b"")
    out = storage.download_dir(f"s3://{s3_bucket}/ckpt", tmp_path / "restored")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["model.bin"]
    assert not escape.exists() and not (tmp_path / "outside").exists()
    assert not list(tmp_path.parent.glob("escape2.bin")) and not list(tmp_path.glob("escape2.bin"))
    assert storage.list_uris(f"s3://{s3_bucket}/ckpt") == [f"s3://{s3_bucket}/ckpt/_SUCCESS",
                                                           f"s3://{s3_bucket}/ckpt/model.bin"]


def test_inside_resolves_and_refuses_a_path_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert storage.inside(root / "a" / ".." / "b", root, "x") == (root / "b").resolve()
    (root / "link").symlink_to(tmp_path)
    for bad in (root / ".." / "b", Path("/etc/passwd"), root / "link" / "b"):
        with pytest.raises(EupeError, match=rf"refusing to write x outside {root}: "):
            storage.inside(bad, root, "x")
