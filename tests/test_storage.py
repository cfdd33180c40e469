"""eupe.storage: local atomic writes and the S3 layer against a real moto_server process."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from eupe import storage
from eupe.errors import EupeError

# --------------------------------------------------------------------------- local


def test_split_s3_and_is_s3() -> None:
    assert storage.is_s3("s3://b/k/x.bin") and not storage.is_s3("/tmp/x") and not storage.is_s3(Path("s3:/x"))
    assert storage.split_s3("s3://bucket/a/b.json") == ("bucket", "a/b.json")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    for bad in ("s3:///key", "/local/path", "s3://b/../escape"):
        with pytest.raises(EupeError, match="s3"):
            storage.split_s3(bad)


def test_write_bytes_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "blob.bin"
    storage.write_bytes(target, b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["blob.bin"]
    assert storage.read_bytes(target) == b"two"


def test_write_json_serialisation_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    storage.write_json(target, {"step": 1, "name": "a"})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        storage.write_json(target, {"step": 2, "bad": object()})
    assert target.read_bytes() == before
    assert storage.read_json(target) == {"step": 1, "name": "a"}
    assert os.listdir(tmp_path) == ["meta.json"]
    assert before.decode().startswith('{\n  "step": 1')  # indent=2, key order kept


def test_write_failure_after_partial_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "meta.json"
    storage.write_json(target, {"v": 1})

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the temp file already holds the new bytes
    with pytest.raises(EupeError, match=r"cannot write .*meta\.json: No space left"):
        storage.write_json(target, {"v": 2, "padding": "x" * 10000})
    monkeypatch.undo()
    assert storage.read_json(target) == {"v": 1}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_read_json_invalid_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EupeError, match=r"invalid JSON in .*bad\.json"):
        storage.read_json(bad)


def test_atomic_dir_removes_temp_dir_on_exception(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_dir(final) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(f"ckpt.tmp-{os.getpid()}-")
            (tmp / "half.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not tmp.exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert os.listdir(final) == ["old.bin"]


def test_atomic_dir_replaces_existing_directory(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with storage.atomic_dir(final) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "new.bin").write_bytes(b"new")
        assert os.listdir(final) == ["old.bin"]  # readers still see the old directory
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert [p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()] == ["nested/new.bin"]

    fresh = tmp_path / "a" / "b" / "fresh"
    with storage.atomic_dir(fresh) as tmp:
        (tmp / "x").write_text("x")
    assert (fresh / "x").read_text() == "x"


def test_local_copy_and_read_of_missing_file_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(EupeError, match=f"file not found: {missing}"):
        storage.local_copy(missing)
    with pytest.raises(EupeError, match=f"file not found: {missing}"):
        storage.read_bytes(str(missing))
    present = tmp_path / "w.bin"
    present.write_bytes(b"w")
    assert storage.local_copy(str(present)) == present
    assert storage.exists(present) and not storage.exists(missing)


def test_list_uris_local_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    for rel in ("b/2.JPG", "a/1.jpg", "a/notes.txt", "c/d/3.png", "top.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    everything = storage.list_uris(tmp_path)
    assert everything == sorted(everything) and len(everything) == 5
    got = storage.list_uris(str(tmp_path), suffixes=[".jpg", ".png"])
    assert got == [str(tmp_path / r) for r in ("a/1.jpg", "b/2.JPG", "c/d/3.png")]
    with pytest.raises(EupeError, match="directory not found"):
        storage.list_uris(tmp_path / "missing")


def test_upload_download_dir_local_target(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    storage.upload_dir(src, tmp_path / "published")
    assert (tmp_path / "published" / "_SUCCESS").exists()
    storage.download_dir(str(tmp_path / "published"), tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    with pytest.raises(EupeError, match="no _SUCCESS marker"):
        storage.download_dir(src, tmp_path / "out2")


# --------------------------------------------------------------------------- S3 (real moto_server)


def _client():  # a client independent of the one under test
    return boto3.session.Session().client("s3")


def test_s3_write_read_exists_round_trip(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/runs/1/blob.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00payload\xff")
    assert storage.exists(uri)
    assert storage.exists(f"s3://{s3_bucket}/runs/1")  # a non-empty prefix
    assert not storage.exists(f"s3://{s3_bucket}/runs/2")
    assert storage.read_bytes(uri) == b"\x00payload\xff"
    assert _client().get_object(Bucket=s3_bucket, Key="runs/1/blob.bin")["Body"].read() == b"\x00payload\xff"

    juri = f"s3://{s3_bucket}/runs/1/meta.json"
    storage.write_json(juri, {"z": 1, "a": [1, 2]})
    assert storage.read_json(juri) == {"z": 1, "a": [1, 2]}
    assert not storage.exists(f"s3://no-such-bucket-{s3_bucket}/k")


def test_s3_missing_key_or_bucket_is_one_line_eupe_error(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/missing/weights.bin"
    for call in (lambda: storage.local_copy(uri, cache_dir=tmp_path), lambda: storage.read_bytes(uri)):
        with pytest.raises(EupeError) as err:
            call()
        assert str(err.value) == f"cannot read {uri}: NoSuchKey"
    nobucket = f"s3://no-such-bucket-{s3_bucket}/k"
    with pytest.raises(EupeError, match=f"cannot read {nobucket}: NoSuchBucket"):
        storage.read_bytes(nobucket)
    with pytest.raises(EupeError, match="cannot write .*NoSuchBucket"):
        storage.write_bytes(nobucket, b"x")
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_s3_local_copy_downloads_then_reuses_cache(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/data/shard-000.bin"
    storage.write_bytes(uri, b"A" * 1000)
    first = storage.local_copy(uri, cache_dir=tmp_path)
    assert first == tmp_path / "s3" / s3_bucket / "data" / "shard-000.bin"
    assert first.read_bytes() == b"A" * 1000
    stat1 = first.stat()

    again = storage.local_copy(uri, cache_dir=tmp_path)
    stat2 = again.stat()
    assert again == first
    assert (stat2.st_mtime_ns, stat2.st_ino) == (stat1.st_mtime_ns, stat1.st_ino)  # not re-downloaded

    storage.write_bytes(uri, b"B" * 1000)  # same size, new content: only the ETag tells
    assert storage.local_copy(uri, cache_dir=tmp_path).read_bytes() == b"B" * 1000

    first.write_bytes(b"truncated")  # a damaged cache file (size mismatch) is fetched again
    assert storage.local_copy(uri, cache_dir=tmp_path).read_bytes() == b"B" * 1000
    assert sorted(p.name for p in first.parent.iterdir()) == ["shard-000.bin", "shard-000.bin.etag"]


def test_s3_local_copy_default_cache_is_eupe_cache(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EUPE_CACHE", str(tmp_path / "cache"))
    storage.write_bytes(f"s3://{s3_bucket}/x.txt", b"x")
    assert storage.local_copy(f"s3://{s3_bucket}/x.txt") == tmp_path / "cache" / "s3" / s3_bucket / "x.txt"


def _make_checkpoint(root: Path) -> dict[str, bytes]:
    files = {
        "model.safetensors": os.urandom(300_000),
        "optimizer/state.pt": os.urandom(50_000),
        "meta.json": b'{"step": 10}',
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_s3_upload_download_dir_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    files = _make_checkpoint(tmp_path / "ckpt")
    prefix = f"s3://{s3_bucket}/checkpoints/step-10"
    writes: list[str] = []
    record = lambda params, **kw: writes.append(params["Key"])  # noqa: E731
    events = storage._client().meta.events
    events.register("before-parameter-build.s3.PutObject", record)
    try:
        storage.upload_dir(tmp_path / "ckpt", prefix)
    finally:
        events.unregister("before-parameter-build.s3.PutObject", record)
    assert sorted(writes[:-1]) == sorted(f"checkpoints/step-10/{r}" for r in files)
    assert writes[-1] == "checkpoints/step-10/_SUCCESS"  # the marker goes last

    out = tmp_path / "restored"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"stale")  # replaced as a whole
    assert storage.download_dir(prefix + "/", out) == out
    assert _tree(out) == files
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "restored"]

    # Re-uploading a smaller directory removes objects of the previous upload.
    (tmp_path / "ckpt" / "optimizer" / "state.pt").unlink()
    storage.upload_dir(tmp_path / "ckpt", prefix)
    storage.download_dir(prefix, out)
    assert set(_tree(out)) == {"model.safetensors", "meta.json", "empty.txt"}


def test_s3_download_dir_without_success_marker_refused(s3_bucket: str, tmp_path: Path) -> None:
    prefix = f"s3://{s3_bucket}/checkpoints/partial"
    storage.write_bytes(prefix + "/model.safetensors", b"half")
    with pytest.raises(EupeError) as err:
        storage.download_dir(prefix, tmp_path / "out")
    assert str(err.value) == f"incomplete upload at {prefix}: no _SUCCESS marker"
    assert os.listdir(tmp_path) == []


def test_s3_list_uris_paginates_and_filters(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client()
    keys = [f"imgs/{i:03d}.jpg" for i in range(25)] + ["imgs/sub/x.PNG", "imgs/readme.txt", "imgsx/z.txt", "other/y.jpg"]
    for k in keys:
        client.put_object(Bucket=s3_bucket, Key=k, Body=b"")
    calls = []
    real_client = storage._client()
    monkeypatch.setattr(storage, "_LIST_PAGE_SIZE", 4)  # many pages with few objects
    count = lambda **kw: calls.append(1)  # noqa: E731
    real_client.meta.events.register("before-call.s3.ListObjectsV2", count)
    try:
        listed = storage.list_uris(f"s3://{s3_bucket}/imgs")  # not the sibling prefix imgsx/
    finally:
        real_client.meta.events.unregister("before-call.s3.ListObjectsV2", count)
    assert len(listed) == 27 and listed == sorted(listed)
    assert len(calls) == 7  # ceil(27 / 4) pages followed via continuation tokens
    assert storage.list_uris(f"s3://{s3_bucket}/imgs/", suffixes=[".png", ".txt"]) == [
        f"s3://{s3_bucket}/imgs/readme.txt",
        f"s3://{s3_bucket}/imgs/sub/x.PNG",
    ]
    assert storage.list_uris(f"s3://{s3_bucket}", suffixes=(".jpg",))[-1] == f"s3://{s3_bucket}/other/y.jpg"
    assert storage.list_uris(f"s3://{s3_bucket}/imgsx") == [f"s3://{s3_bucket}/imgsx/z.txt"]
