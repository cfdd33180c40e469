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


# --------------------------------------------------------------------------- atomicity, by breaking it


def test_write_replaces_the_file_by_rename_so_readers_keep_the_old_inode(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "blob.bin"  # parents created
    storage.write_bytes(target, b"old")
    with open(target, "rb") as reader:  # a reader that opened the old version keeps reading it
        storage.write_bytes(target, b"new")
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new"


def test_write_gets_a_new_inode_not_an_in_place_rewrite(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    storage.write_bytes(target, b"old")
    before = os.stat(target).st_ino
    keep = target.with_name("hardlink")
    os.link(target, keep)  # holds the old inode so the new file cannot reuse its number
    storage.write_bytes(target, b"new")
    assert os.stat(target).st_ino != before and keep.read_bytes() == b"old"


def test_write_goes_through_a_hidden_temp_file_in_the_same_folder_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    target = tmp_path / "blob.bin"
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", (Path(src).parent, Path(src).name.startswith(".blob.bin.tmp-"), Path(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    storage.write_bytes(target, b"payload")
    assert events == [("fsync", "file"), ("replace", (tmp_path, True, target)), ("fsync", "dir")]
    assert target.read_bytes() == b"payload"


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")

    def cross_device(src, dst) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", cross_device)
    with pytest.raises(EupeError) as err:
        storage.write_bytes(target, b"new")
    assert str(err.value) == f"cannot write {target}: Invalid cross-device link"
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["meta.json"]


def test_an_interrupt_during_the_write_is_not_wrapped_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")

    def interrupted(src, dst) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["meta.json"]


def test_an_interrupt_right_after_the_rename_keeps_the_new_file_and_stays_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")
    real_replace = os.replace

    def replaced_then_interrupted(src, dst) -> None:
        real_replace(src, dst)  # the temp file is gone: the cleanup must not fail on it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replaced_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["meta.json"]


def test_a_write_below_a_file_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    target = tmp_path / "plain" / "blob.bin"
    with pytest.raises(EupeError) as err:
        storage.write_bytes(target, b"x")
    assert str(err.value) in (f"cannot write {target}: File exists", f"cannot write {target}: Not a directory")


def test_written_files_get_the_umask_mode_not_the_private_temp_file_mode(tmp_path: Path) -> None:
    storage._file_mode.cache_clear()
    old = os.umask(0o002)
    try:
        storage.write_bytes(tmp_path / "shared.bin", b"x")
    finally:
        os.umask(old)
        storage._file_mode.cache_clear()
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == 0o664


def test_a_folder_that_cannot_be_fsynced_does_not_fail_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    real_fsync, real_open, real_close = os.fsync, os.open, os.close
    opened: list[int] = []
    closed: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # some file systems refuse fsync on a folder
        real_fsync(fd)

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        if os.path.isdir(path):
            opened.append(fd)
        return fd

    def close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "close", close)
    storage.write_bytes(tmp_path / "a.bin", b"a")
    assert len(opened) == 1 and opened == closed  # the folder's descriptor is closed all the same

    def no_folder_open(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_folder_open)
    storage.write_bytes(tmp_path / "b.bin", b"b")  # a folder that cannot even be opened
    assert (tmp_path / "a.bin").read_bytes() == b"a" and (tmp_path / "b.bin").read_bytes() == b"b"


def test_write_json_is_indented_with_a_final_newline(tmp_path: Path) -> None:
    storage.write_json(tmp_path / "m.json", {"b": [1, 2], "a": "é"})
    assert (tmp_path / "m.json").read_bytes() == b'{\n  "b": [\n    1,\n    2\n  ],\n  "a": "\\u00e9"\n}\n'


def _checkpoint_dir(path: Path, content: bytes) -> None:
    path.mkdir(parents=True)
    (path / "w.bin").write_bytes(content)


def test_atomic_dir_keeps_the_old_folder_when_the_final_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "ckpt"
    _checkpoint_dir(final, b"old")
    real_rename = os.rename

    def rename(src, dst) -> None:
        if Path(dst) == final:  # the new folder moving in (or the old one moving back)
            if ".tmp-" in Path(src).name:
                raise OSError(39, "Directory not empty")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Directory not empty"):
        with storage.atomic_dir(final) as tmp:
            (tmp / "w.bin").write_bytes(b"new")
    assert os.listdir(tmp_path) == ["ckpt"] and (final / "w.bin").read_bytes() == b"old"


def test_atomic_dir_moves_the_old_folder_aside_before_and_deletes_it_only_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "ckpt"
    _checkpoint_dir(final, b"old")
    old_inode = final.stat().st_ino
    real_rename = os.rename
    seen: list[tuple[str, str, list[str]]] = []

    def rename(src, dst) -> None:
        # which folders exist (and hold the old checkpoint) at the moment of each rename
        seen.append((Path(src).name.split("-")[0], Path(dst).name.split("-")[0],
                     sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if (p / "w.bin").read_bytes() == b"old")))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with storage.atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"new")
        new_inode = tmp.stat().st_ino
    assert seen == [("ckpt", "ckpt.old", ["ckpt"]), ("ckpt.tmp", "ckpt", ["ckpt.old"])]
    assert os.listdir(tmp_path) == ["ckpt"] and (final / "w.bin").read_bytes() == b"new"
    assert final.stat().st_ino == new_inode != old_inode


def test_atomic_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_bytes(b"not a folder")
    with pytest.raises(EupeError) as err:
        with storage.atomic_dir(tmp_path / "ckpt"):
            pass
    assert str(err.value) == f"not a directory: {tmp_path / 'ckpt'}"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_read_json_of_a_binary_file_is_one_line_naming_it(tmp_path: Path) -> None:
    for name, data in (("utf16.json", b"\xff\xfe\x00binary"), ("png.json", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8"),
                       ("deep.json", b"[" * 100_000)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EupeError) as err:
            storage.read_json(tmp_path / name)
        assert str(err.value).startswith(f"invalid JSON in {tmp_path / name}: ") and "\n" not in str(err.value)
