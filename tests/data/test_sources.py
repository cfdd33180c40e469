"""Sources: S3 image folders, WebDataset shards (split over ranks x workers), weighted mixtures, skip-and-count."""

from __future__ import annotations

import collections
import io
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from eupe.config import load_config
from eupe.data.folder import ImageFolder, open_source
from eupe.data.loader import StepBatchSampler
from eupe.data.sources import (
    MixedStream,
    Mixture,
    S3ImageFolder,
    ShardStream,
    open_data,
    open_uri,
    read_sample,
    read_shard,
    stream_loader,
    write_shards,
)
from eupe.data.synth import synthesize
from eupe.errors import EupeError


def _upload(local: Path, bucket: str, prefix: str) -> str:
    s3 = boto3.client("s3")
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """24 samples in 8 shards of 3; the label of sample i is i (so every sample is identifiable after decoding)."""
    root = tmp_path_factory.mktemp("shards")
    synthesize(root / "ds", 24, size=(40, 56), seed=2, num_classes=4)
    paths = write_shards(ImageFolder(root / "ds"), root / "tars", per_shard=3)
    relabelled = []
    for path in paths:  # rewrite .cls to the sample's global number
        out = path.with_name("id-" + path.name)
        with tarfile.open(path) as src, tarfile.open(out, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if m.name.endswith(".cls"):
                    data = str(int(m.name.split(".")[0])).encode()
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
        relabelled.append(out)
    for p in paths:
        p.unlink()
    return relabelled


def test_shard_epoch_covers_every_sample_once_across_ranks_and_workers(shards):
    stream = ShardStream([str(p) for p in shards], seed=5, shuffle_buffer=4)
    for readers in (1, 2, 4, 8):  # world_size x num_workers
        for epoch in (0, 1):
            seen = [rec.label for r in range(readers) for rec in stream.epoch(epoch, r, readers)]
            assert sorted(seen) == list(range(24)), (readers, epoch)
    # shard i goes to reader i % readers; the order within a reader is seeded by (seed, epoch, reader)
    first = [rec.label for rec in stream.epoch(0, 1, 4)]
    assert {label // 3 for label in first} == {1, 5}
    assert first == [rec.label for rec in stream.epoch(0, 1, 4)]
    assert first != [rec.label for rec in stream.epoch(1, 1, 4)]
    with pytest.raises(EupeError, match="8 shards cannot feed 9 readers"):
        list(stream.epoch(0, 0, 9))


def test_shard_stream_through_dataloader_workers_and_ranks(shards):
    """2 ranks x 2 DataLoader workers: the first epoch of every reader, together, is each sample once."""
    stream = ShardStream([str(p) for p in shards], seed=1, shuffle_buffer=2)
    labels = []
    for rank in range(2):
        loader = stream_loader(stream, 32, batch_size=3, num_workers=2, rank=rank, world_size=2)
        batches = iter(loader)
        for _ in range(4):  # 4 readers x 6 samples = 24; per rank 12 samples = 4 batches of 3
            images, label, skipped = next(batches)
            assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
            assert skipped.tolist() == [0, 0, 0]
            labels += label.tolist()
    assert sorted(labels) == list(range(24))
    # resume: starting at batch 3 of rank 0 gives what an uninterrupted run gives from there
    full = [next(b)[1].tolist() for b in [iter(stream_loader(stream, 16, 3, 2, rank=0, world_size=2))] for _ in range(6)]
    resumed = iter(stream_loader(stream, 16, 3, 2, start_batch=3, rank=0, world_size=2))
    assert [next(resumed)[1].tolist() for _ in range(3)] == full[3:]


def test_undecodable_shard_member_is_skipped_and_counted(tmp_path, shards):
    bad = tmp_path / "bad.tar"
    with tarfile.open(shards[0]) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.startswith("000000001.") and m.name.endswith(".jpg"):
                data = data[: len(data) // 3]  # truncated JPEG
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    stream = ShardStream([str(bad)], seed=0, shuffle_buffer=1)
    out = list(zip(range(3), iter(stream_loader(stream, 16, batch_size=1, num_workers=0))))
    labels = [int(batch[1]) for _, batch in out]
    skipped = [int(batch[2]) for _, batch in out]
    assert labels == [0, 2, 0]  # sample 1 skipped, then the next epoch
    assert skipped == [0, 1, 0]


def test_shards_stream_from_s3_like_from_disk(s3_bucket, shards):
    uri = _upload(shards[0].parent, s3_bucket, "tars")
    stream = open_uri(f"{uri}/id-shard-00000[0-3].tar")
    assert isinstance(stream, ShardStream) and len(stream.shards) == 4
    remote = list(read_shard(stream.shards[2]))
    local = list(read_shard(str(shards[2])))
    assert [r.data for r in remote] == [r.data for r in local]
    assert [r.uri for r in remote] == [f"{uri}/id-shard-000002.tar#{k:09d}.jpg" for k in (6, 7, 8)]
    assert isinstance(open_uri(uri), ShardStream)  # a prefix of shards


def test_open_source_dispatch(tmp_path, tiny_data, shards, s3_bucket):
    assert isinstance(open_source(tiny_data), ImageFolder)
    assert isinstance(open_source(shards[0].parent), ShardStream)
    assert isinstance(open_source(str(shards[0].parent / "*.tar")), ShardStream)
    folder = open_source(_upload(tiny_data, s3_bucket, "imgs"))
    assert isinstance(folder, S3ImageFolder) and len(folder) == 64 and folder.classes == ImageFolder(tiny_data).classes
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jpg").write_bytes((tiny_data / "circle" / "000000.jpg").read_bytes())
    (mixed / "b.tar").write_bytes(shards[0].read_bytes())
    with pytest.raises(EupeError, match="both images and .tar shards"):
        open_source(mixed)
    with pytest.raises(EupeError, match=f"no images in s3://{s3_bucket}/nothing"):
        open_source(f"s3://{s3_bucket}/nothing")


def test_unreadable_s3_key_is_one_line_error_naming_it(s3_bucket, tiny_data):
    source = S3ImageFolder(_upload(tiny_data, s3_bucket, "ds"))
    gone = source.uri(3)
    bucket, key = gone[len("s3://"):].split("/", 1)
    boto3.client("s3").delete_object(Bucket=bucket, Key=key)
    assert source.open(2).size  # the others still read
    with pytest.raises(EupeError) as err:
        source.open(3)
    assert gone in str(err.value) and "\n" not in str(err.value)


def test_undecodable_s3_image_is_skipped_deterministically(s3_bucket, tiny_data):
    source = S3ImageFolder(_upload(tiny_data, s3_bucket, "ds"))
    bucket, key = source.uri(5)[len("s3://"):].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"not a jpeg")
    image, label, skipped = read_sample(source, 5)
    assert (skipped, label) == (1, source.label(6))
    assert np.array_equal(np.asarray(image), np.asarray(source.open(6)))
    assert read_sample(source, 4)[2] == 0


def test_mixture_proportions_and_coverage(tmp_path):
    synthesize(tmp_path / "lvd", 45, size=24, seed=1, num_classes=3)
    synthesize(tmp_path / "in1k", 10, size=24, seed=2, num_classes=5)
    cfg = load_config(overrides=[
        f"data.sources=[{{uri: {tmp_path / 'lvd'}, weight: 0.9, domain: lvd}}, {{uri: {tmp_path / 'in1k'}, weight: 0.1, domain: in1k}}]"])
    mix = open_data(cfg.data, seed=0)
    assert isinstance(mix, Mixture)
    assert mix.classes == sorted(set(ImageFolder(tmp_path / "lvd").classes) | set(ImageFolder(tmp_path / "in1k").classes))
    # the trainer's sampler over the mixture: data at a step is a pure function of (seed, step)
    sampler = StepBatchSampler(len(mix), global_batch=50, micro_batch=25, start_step=0, total_steps=40, seed=3)
    drawn = [i for batch in sampler for i, _ in batch]
    domains = collections.Counter(mix.domain(i) for i in drawn)
    assert abs(domains["lvd"] / len(drawn) - 0.9) < 0.02, domains
    epoch = [mix.locate(i) for i in range(len(mix))]  # one epoch: exact shares, every image drawn equally
    per_image = collections.Counter(epoch)
    assert len(per_image) == 55 and len(set(per_image.values())) <= 2
    assert sum(1 for k, _ in epoch if k == 0) / len(epoch) == pytest.approx(0.9, abs=0.01)
    resumed = StepBatchSampler(len(mix), 50, 25, start_step=20, total_steps=40, seed=3)
    assert [i for batch in resumed for i, _ in batch] == drawn[20 * 50:]
    assert mix.label(0) == mix.classes.index(ImageFolder(tmp_path / "lvd").classes[ImageFolder(tmp_path / "lvd").label(0)])


def test_stream_mixture_proportions(tmp_path, shards):
    synthesize(tmp_path / "in1k", 12, size=24, seed=2, num_classes=2)
    cfg = load_config(overrides=[
        f"data.sources=[{{uri: {shards[0].parent}, weight: 0.9, domain: lvd}}, {{uri: {tmp_path / 'in1k'}, weight: 0.1, domain: in1k}}]",
        "data.shuffle_buffer=8"])
    mix = open_data(cfg.data, seed=0)
    assert isinstance(mix, MixedStream)
    records = mix.records(0, 1)
    domains = collections.Counter(next(records).domain for _ in range(2000))
    assert abs(domains["lvd"] / 2000 - 0.9) < 0.03, domains


def test_shard_labels_from_json_and_cls_and_bad_label_named(tmp_path, tiny_data):
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    members = [("x/a.png", png.getvalue()), ("x/a.json", b'{"label": 2, "domain": "web"}'),
               ("x/n.txt", b"no image here"),
               ("x/b.jpg", (tiny_data / "circle" / "000000.jpg").read_bytes()), ("x/b.cls", b"cat")]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = read_shard(str(path))
    first = next(records)
    assert (first.uri, first.label, first.domain) == (f"{path}#x/a.png", 2, "web")
    with pytest.raises(EupeError, match=r"s\.tar#x/b: bad \.cls/\.json label"):
        next(records)  # x/n (no image) is passed over, x/b has a non-integer .cls


def test_s3_glob_stays_within_one_path_segment(s3_bucket, shards):
    from eupe.data.sources import _expand_glob

    prefix = _upload(shards[0].parent, s3_bucket, "lvd")
    boto3.client("s3").upload_file(str(shards[0]), s3_bucket, "lvd/old/stale.tar")
    found = _expand_glob(f"{prefix}/*.tar")
    assert len(found) == len(shards) and not any("/old/" in u for u in found)  # as a local glob would
