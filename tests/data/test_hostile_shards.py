"""Hostile ``.tar`` shards cost bounded memory and never a path: a gzip bomb's 1.5 GB member is skipped
unread (peak RSS measured in a fresh process), members named outside the shard are skipped, and every
skip is counted like an undecodable image, by the training stream and by the data scan (real CLI)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from eupe.cli import main
from eupe.data.sources import ShardStream, read_shard

BOMB_BYTES = 1_500_000_000  # one member of zeros: ~6.5 MB gzipped
RSS_BOUND_MIB = 64  # what reading the bomb may add to the peak RSS of a process (the member alone is 1430 MiB)


def _png(seed: int, side: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bomb(path: Path) -> Path:
    """A gzip shard: a good sample, one member of BOMB_BYTES zeros (streamed from /dev/zero, never held in
    memory), another good sample."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        _add(tar, "000000000.png", _png(0))
        info = tarfile.TarInfo("000000001.png")
        info.size = BOMB_BYTES
        with open("/dev/zero", "rb") as zero:
            tar.addfile(info, zero)
        _add(tar, "000000002.png", _png(2))
    return path


READ_IN_A_FRESH_PROCESS = """
import json, resource, sys
from eupe.data.sources import ShardStream
next(iter(ShardStream([sys.argv[2]], shuffle_buffer=1)))  # every import a stream makes, before measuring
stream = ShardStream([sys.argv[1]], shuffle_buffer=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
it = iter(stream)
got = [next(it) for _ in range(2)]  # the two good samples of the first epoch
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (after - before) / 1024, "sizes": [list(im.size) for im, _, _ in got],
                  "skipped": [s for _, _, s in got]}))
"""


def test_a_gzip_bomb_member_is_skipped_unread_in_bounded_memory_and_counted(tmp_path: Path) -> None:
    shard = _bomb(tmp_path / "bomb.tar.gz")
    assert shard.stat().st_size < 20 << 20
    warm = _named(tmp_path / "warm.tar.gz", ["000000000.png"])
    proc = subprocess.run([sys.executable, "-c", READ_IN_A_FRESH_PROCESS, str(shard), str(warm)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["growth_mib"] < RSS_BOUND_MIB, report  # today's main: +2863 MiB
    assert report["sizes"] == [[32, 32], [32, 32]] and report["skipped"] == [0, 1]  # the bomb: counted, not decoded
    assert f"{shard}#000000001: {BOMB_BYTES} bytes, over the {128 << 20}-byte limit of one image file" in proc.stderr


def _named(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for i, name in enumerate(names):
            _add(tar, name, _png(i))
    return path


def test_members_named_outside_the_shard_are_skipped_and_counted_never_samples(tmp_path: Path, capsys) -> None:
    shard = _named(tmp_path / "evil.tar", ["../../000000000.png", "/tmp/000000001.png", "a/../../000000002.png",
                                           "000000003.png", "..\\..\\000000004.png"])
    records = list(read_shard(str(shard)))
    assert [r.uri for r in records if not r.skipped] == [f"{shard}#000000003.png"]
    assert sum(1 for r in records if r.skipped) == 4 and all(r.data == b"" for r in records if r.skipped)
    it = iter(ShardStream([str(shard)], shuffle_buffer=1))
    _, _, skipped = next(it)
    assert skipped == 3  # the three before it (file order); the fourth comes with the next sample
    assert main(["data", "scan", "--data", str(shard), "--out", str(tmp_path / "scan")]) == 0
    rows = pd.read_parquet(tmp_path / "scan" / "manifest.parquet")
    assert rows["decodable"].tolist() == [False, False, False, True, False]
    assert rows["error"].iloc[0] == "member named outside the shard (absolute or '..'): not read"
    assert not (tmp_path / "000000000.png").exists() and not Path("/tmp/000000001.png").exists()


def test_a_sample_a_shard_or_a_header_over_its_limit_is_skipped_and_counted(tmp_path: Path) -> None:
    one = _png(1)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "000000000.png", one)
        _add(tar, "000000001.png", one)  # with its .json, over a limit of 1.5 images per sample
        _add(tar, "000000001.json", b"{" + b" " * len(one) + b"}")
        _add(tar, "000000002.png", one)
    limit = len(one) * 3 // 2
    got = [(r.uri.rsplit("#", 1)[1], r.skipped) for r in read_shard(str(shard), max_member=limit)]
    assert got == [("000000000.png", None), ("000000001", f"sample of over {limit} bytes (the limit of one image file)"),
                   ("000000002.png", None)]

    got = [(r.uri.rsplit("#", 1)[1], r.skipped) for r in read_shard(str(shard), max_bytes=4 * len(one))]
    assert got == [("000000000.png", None), ("<rest from 000000001>", "rest of the shard not read: over "
                                              f"{4 * len(one)} bytes decompressed (the shard limit)")]

    header = tmp_path / "header.tar"  # a pax header tarfile would read whole: 1 MB, over a 64 KiB member limit
    with tarfile.open(header, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "000000000.png", one)
        info = tarfile.TarInfo("000000001.png")
        info.size, info.pax_headers = len(one), {"comment": "x" * 1_000_000}
        tar.addfile(info, io.BytesIO(one))
    got = [(r.uri.rsplit("#", 1)[1], r.skipped) for r in read_shard(str(header), max_member=64 << 10)]
    assert got[0] == ("000000000.png", None) and len(got) == 2 and got[1][0] == "<rest>"
    assert got[1][1].startswith("rest of the shard not read: a tar header of over ")
