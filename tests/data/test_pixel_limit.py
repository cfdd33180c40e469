"""Training decodes with the pixel limit of validation (``validation.max_pixels``), not Pillow's: a small PNG
that declares more pixels is skipped and counted like an undecodable file, from an image folder and from
``.tar`` shards, through the trainer's own loaders."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from eupe.config import load_config
from eupe.data.loader import StepBatchSampler, step_loader
from eupe.data.sources import open_data, stream_loader, write_shards

LIMIT = 1_000_000  # validation.max_pixels of the recipe
SIDE = 2000  # the big PNG: 4 Mpx, a few KB on disk


def _dataset(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    Image.new("L", (SIDE, SIDE)).save(root / "a" / "000_big.png")  # first in file order
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "a" / f"{i + 1:03d}.png")
    assert (root / "a" / "000_big.png").stat().st_size < 64 << 10
    return root


def _cfg(data: Path):
    return load_config(None, [f"data.root={data}", f"validation.max_pixels={LIMIT}", "data.num_workers=0",
                              "data.shuffle_buffer=1"])


def test_an_image_folder_skips_and_counts_a_png_over_validation_max_pixels(tmp_path: Path) -> None:
    cfg = _cfg(_dataset(tmp_path / "data"))
    source = open_data(cfg.data, cfg.seed, cfg.validation.max_pixels)
    sampler = StepBatchSampler(len(source), 4, 4, 0, 1, cfg.seed)
    images, _, skipped = next(iter(step_loader(source, 32, sampler, 0)))
    assert images.shape == (4, 3, 32, 32) and int(skipped.sum()) == 1  # the big one, replaced by the next


def test_shards_skip_and_count_a_png_over_validation_max_pixels(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    write_shards(open_data(_cfg(data).data), tmp_path / "shards", per_shard=8)
    cfg = _cfg(tmp_path / "shards")
    stream = open_data(cfg.data, cfg.seed, cfg.validation.max_pixels)
    images, _, skipped = next(iter(stream_loader(stream, 32, 3, 0)))
    assert images.shape == (3, 3, 32, 32) and skipped.tolist() == [1, 0, 0]


def test_the_limit_is_read_from_the_header_before_any_pixel_is_decoded(tmp_path: Path) -> None:
    """A PNG declaring 10000 x 10000 pixels in a few hundred bytes, under Pillow's limit (300 MB as RGB, then
    converted): refused from its header by the validation limit."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = (10000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    data = _dataset(tmp_path / "data")
    (data / "a" / "000_big.png").write_bytes(png)
    cfg = _cfg(data)
    source = open_data(cfg.data, cfg.seed, cfg.validation.max_pixels)
    sampler = StepBatchSampler(len(source), 4, 4, 0, 1, cfg.seed)
    _, _, skipped = next(iter(step_loader(source, 32, sampler, 0)))
    assert int(skipped.sum()) == 1
