"""Training reads through every source: .tar shards and weighted mixtures; undecodable files are skipped and counted."""

from __future__ import annotations

import json

from eupe.cli import main
from eupe.data.folder import ImageFolder
from eupe.data.sources import ShardStream, stream_loader, write_shards
from eupe.data.synth import synthesize


def test_mixture_with_a_broken_file_trains_and_counts_it(tmp_path, tiny_config):
    synthesize(tmp_path / "lvd", 12, size=(48, 64), seed=1, num_classes=3)
    synthesize(tmp_path / "in1k", 4, size=(48, 64), seed=2, num_classes=2)
    next((tmp_path / "lvd").rglob("*.jpg")).write_bytes(b"this is not a jpeg")
    mix = (f"data.sources=[{{uri: {tmp_path / 'lvd'}, weight: 0.75, domain: lvd}}, "
           f"{{uri: {tmp_path / 'in1k'}, weight: 0.25, domain: in1k}}]")
    common = ["--config", str(tiny_config), "--set", mix, "--stage", "1"]
    assert main(["normalize", *common, "--out", str(tmp_path / "norm")]) == 0
    # 12 + 4 images at 0.75/0.25: one epoch is 16 samples = 2 steps x batch 8, so the broken file is drawn once
    assert main(["train", *common, "--set", "stage1.iters=2", "--set", "stage1.warmup_iters=1",
                 "--norm", str(tmp_path / "norm" / "norm.safetensors"), "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "ok" and result["metrics"]["skipped_images"] == 1


def test_training_streams_tar_shards(tmp_path, tiny_config):
    synthesize(tmp_path / "ds", 16, size=(48, 64), seed=3, num_classes=4)
    next((tmp_path / "ds").rglob("*.jpg")).write_bytes(b"\xff\xd8 truncated")
    shards = write_shards(ImageFolder(tmp_path / "ds"), tmp_path / "shards", per_shard=4)
    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--out", str(tmp_path / "norm")]) == 0
    # 2 steps x batch 8 = 16 samples from the one reader (num_workers 0), the broken file among them
    assert main(["train", "--config", str(tiny_config), "--data", str(tmp_path / "shards"), "--stage", "1",
                 "--set", "stage1.iters=2", "--set", "stage1.warmup_iters=1",
                 "--norm", str(tmp_path / "norm" / "norm.safetensors"), "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    oracle = iter(stream_loader(ShardStream([str(s) for s in shards], seed=0), 16, 4, 0))
    expected = sum(int(next(oracle)[2].sum()) for _ in range(4))  # 2 steps x 2 micro-batches of 4
    assert expected >= 1 and result["metrics"]["skipped_images"] == expected
