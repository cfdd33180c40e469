"""The training crop is cut while decoding (JPEG draft mode) and stays what the previous path gave.

Same seed, same box and flip as ``torchvision``'s ``RandomResizedCrop`` + flip on the whole image; files the
draft does not apply to (PNG, crops under twice the output) give the previous path's tensor bit for bit;
drafted JPEGs differ from it by a fraction of a grey level on average, with the same per-channel statistics;
refusals (pixel limit, corrupt files) are skipped and counted as before, from folders and from shards. An
upright RGB JPEG decoded straight into an array (the crop a view of it) gives Pillow's crop bit for bit, and
refuses what Pillow's own load refuses.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from eupe.data.decode import UndecodableImage, decode_crop, decode_crop_pixels, draft_scale
from eupe.data.folder import ImageFolder
from eupe.data.loader import DistillImages, StepBatchSampler, _resized, augment_bytes, crop_params, step_loader
from eupe.data.sources import ShardStream, stream_loader, write_shards

SIZE = 32  # output side: JPEGs of 100-300 px then have crops of 2x, 4x and 8x it


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour gradients, a few rectangles and noise: photo-like enough for JPEG and resizing."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, 3)
    slope = rng.uniform(-0.4, 0.4, (2, 3))
    img = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        img[y0 : y0 + int(rng.integers(8, height)), x0 : x0 + int(rng.integers(8, width))] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(buf, "JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(24):
        w, h = [(80, 60), (240, 176), (304, 224), (120, 160)][i % 4]
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        (root / f"c{i % 2}" / f"{i:03d}.jpg").write_bytes(_jpeg(_photo(rng, w, h)))
    return root


def test_crop_and_flip_are_torchvisions_for_the_same_seed_from_the_size_alone() -> None:
    extreme = [(20, 300), (300, 20), (1, 1), (7, 500)]  # torchvision's fallback crop
    for seed in range(100):
        height, width = extreme[seed % 4] if seed % 5 == 0 else (50 + seed % 97, 60 + (seed * 7) % 131)
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.35, 1.0], [3 / 4, 4 / 3])
        expected_flip = bool(torch.rand(()) < 0.5)
        assert crop_params(seed, height, width) == (*expected, expected_flip)
    flips = [crop_params(s, 100, 100)[4] for s in range(200)]
    assert 70 < sum(flips) < 130  # a fair coin
    assert not any(crop_params(s, 100, 100, hflip=False)[4] for s in range(50))
    torch.manual_seed(1)
    before = torch.rand(3)
    torch.manual_seed(1)
    crop_params(5, 100, 100)
    assert torch.equal(torch.rand(3), before)  # the global RNG is neither drawn nor reseeded


def test_draft_scale_keeps_at_least_the_output_resolution_in_the_crop() -> None:
    assert draft_scale(1024, 768, (700, 600), 256) == 2
    assert draft_scale(1024, 768, (500, 700), 256) == 1  # 500 < 2 x 256
    assert draft_scale(4000, 3000, (2100, 2900), 256) == 8
    assert draft_scale(4000, 3000, (1100, 2900), 256) == 4
    assert draft_scale(1001, 768, (700, 600), 256, exact=True) == 1  # a rotated image's grid must divide


def test_without_draft_the_output_is_the_previous_paths_bit_for_bit(folder: Path, tmp_path: Path) -> None:
    """PNGs, and JPEGs with draft off, give exactly the previous path's tensors (same crop, flip, resize)."""
    rng = np.random.default_rng(1)
    pngs = tmp_path / "png" / "a"
    pngs.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(_photo(rng, 200 + 8 * i, 150)).save(pngs / f"{i}.png")
    for source in (ImageFolder(tmp_path / "png"), ImageFolder(folder)):
        new, old = DistillImages(source, SIZE), DistillImages(source, SIZE, fast=False)
        for i in range(len(source)):
            if source.files[i].suffix == ".jpg":
                data = source.read_bytes(i)
                a = augment_bytes(data, "x", 10**9, 1000 + i, SIZE, draft=False)
            else:
                a = new[(i, 1000 + i)][0]
            b = old[(i, 1000 + i)][0]
            assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, SIZE, SIZE)
            assert torch.equal(a, b)


def test_drafted_jpegs_match_the_previous_path_in_distribution(folder: Path) -> None:
    source = ImageFolder(folder)
    new, old = DistillImages(source, SIZE), DistillImages(source, SIZE, fast=False)
    scales, a, b = [], [], []
    for k in range(4):
        for i in range(len(source)):
            seed = 7919 * k + i
            data = source.read_bytes(i)
            scales.append(decode_crop(data, "x", SIZE, lambda h, w: crop_params(seed, h, w)[:4])[1])
            a.append(new[(i, seed)][0])
            b.append(old[(i, seed)][0])
    assert {1, 2, 4} <= set(scales)  # the draft is taken, at several scales, and not always
    a, b = torch.stack(a).float(), torch.stack(b).float()
    assert a.shape == b.shape and a.min() >= 0 and a.max() <= 255
    per_image = (a - b).abs().mean(dim=(1, 2, 3))
    assert per_image.mean() < 1.5 and per_image.max() < 4  # same crop, same orientation: grey levels apart
    mean_a, mean_b = a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3))
    std_a, std_b = a.std(dim=(0, 2, 3)), b.std(dim=(0, 2, 3))
    assert torch.allclose(mean_a, mean_b, atol=1.0), (mean_a, mean_b)
    assert torch.allclose(std_a, std_b, rtol=0.03), (std_a, std_b)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_before_the_crop_as_before(orientation: int) -> None:
    pixels = _photo(np.random.default_rng(orientation), 256, 192)  # sides divide by 8: the draft applies
    data = _jpeg(pixels, orientation)
    old = DistillImages(_Bytes(data), SIZE, fast=False)
    for seed in range(6):
        a = augment_bytes(data, "x", 10**9, seed, SIZE).float()
        b = old[(0, seed)][0].float()
        assert a.shape == b.shape and (a - b).abs().mean() < 4


def _cropped_by_pillow(data: bytes, seed: int) -> torch.Tensor:
    """The previous crop-while-decoding path: the box cut by Pillow (decode_crop), copied out, resized."""
    drawn = []

    def crop(height: int, width: int) -> tuple[int, int, int, int]:
        drawn.append(crop_params(seed, height, width))  # the upright size, as the loader draws it
        return drawn[-1][:4]

    cut, _ = decode_crop(data, "x", SIZE, crop)
    return _resized(torch.from_numpy(np.array(cut)).permute(2, 0, 1), SIZE, drawn[-1][4])


def _encoded(pixels: np.ndarray, mode: str = "RGB", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def test_jpegs_decoded_into_an_array_are_pillows_crop_bit_for_bit(folder: Path) -> None:
    """An upright RGB JPEG is decoded straight into an RGBX array and the box is a view of it: same pixels as
    Pillow's crop, same 4-channel resize values; other JPEGs (grey, CMYK, progressive, rotated) as before."""
    source = ImageFolder(folder)
    for i in range(len(source)):
        data = source.read_bytes(i)
        for seed in (i, 10_000 + i, 20_000 + i):
            pixels, scale = decode_crop_pixels(data, "x", SIZE, lambda h, w: crop_params(seed, h, w)[:4])
            cut, scale_before = decode_crop(data, "x", SIZE, lambda h, w: crop_params(seed, h, w)[:4])
            assert pixels.shape == (cut.height, cut.width, 4) and scale == scale_before
            assert np.array_equal(pixels[..., :3], np.asarray(cut))
            assert torch.equal(augment_bytes(data, "x", 10**9, seed, SIZE), _cropped_by_pillow(data, seed))
    pixels = _photo(np.random.default_rng(5), 240, 176)
    others = [_encoded(pixels, "L"), _encoded(pixels, "CMYK"), _encoded(pixels, progressive=True),
              _jpeg(pixels, orientation=6)]
    for data in others:
        for seed in range(4):
            assert torch.equal(augment_bytes(data, "x", 10**9, seed, SIZE), _cropped_by_pillow(data, seed))
    assert decode_crop_pixels(others[2], "x", SIZE, lambda h, w: (0, 0, h, w))[0].shape[2] == 4  # progressive
    assert decode_crop_pixels(others[0], "x", SIZE, lambda h, w: (0, 0, h, w))[0].shape[2] == 3  # grey: Pillow's


def test_jpegs_decoded_into_an_array_are_refused_as_by_pillow(folder: Path) -> None:
    """Truncated and corrupted JPEGs: the same refusal (or the same pixels) as Pillow's own load."""
    source = ImageFolder(folder)
    rng = np.random.default_rng(9)
    for k in range(60):
        data = bytearray(source.read_bytes(k % len(source)))
        if k % 3 == 0:
            data = data[: int(rng.integers(2, len(data)))]
        else:
            for p in rng.integers(0, len(data), int(rng.integers(1, 12))):
                data[p] = int(rng.integers(0, 256))
        outcome = []
        for crop_of in (augment_bytes, lambda d, *a: _cropped_by_pillow(d, a[2])):
            try:
                outcome.append(crop_of(bytes(data), "x", 10**9, k, SIZE))
            except UndecodableImage as e:
                outcome.append(e.reason)
        if isinstance(outcome[0], str) or isinstance(outcome[1], str):
            assert outcome[0] == outcome[1], k
        else:
            assert torch.equal(outcome[0], outcome[1]), k


def test_refusals_are_the_decoders() -> None:
    data = _jpeg(_photo(np.random.default_rng(2), 200, 100))
    with pytest.raises(UndecodableImage, match="decompression bomb: 200x100"):
        augment_bytes(data, "x.jpg", 10_000, 0, SIZE)
    with pytest.raises(UndecodableImage, match="truncated|corrupt"):
        augment_bytes(data[: len(data) // 3], "x.jpg", 10**9, 0, SIZE)
    with pytest.raises(UndecodableImage, match="empty file"):
        augment_bytes(b"", "x.jpg", 10**9, 0, SIZE)


def test_folder_and_shard_loaders_give_the_same_batches_as_before_in_distribution(folder: Path, tmp_path: Path) -> None:
    (folder / "c0" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    try:
        source = ImageFolder(folder)
        batches = {}
        for fast in (True, False):
            sampler = StepBatchSampler(len(source), 25, 25, 0, 1, seed=3)
            batches[fast] = next(iter(step_loader(source, SIZE, sampler, 0, fast=fast)))
        (a, la, sa), (b, lb, sb) = batches[True], batches[False]
        assert a.shape == b.shape == (25, 3, SIZE, SIZE) and a.dtype == b.dtype == torch.uint8
        assert torch.equal(la, lb) and torch.equal(sa, sb) and int(sa.sum()) == 1  # the broken file, counted
        assert (a.float() - b.float()).abs().mean() < 1.5

        write_shards(source, tmp_path / "shards", per_shard=13)
        stream = ShardStream(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shuffle_buffer=4)
        (a, la, sa), (b, lb, sb) = (next(iter(stream_loader(stream, SIZE, 25, 0, fast=f))) for f in (True, False))
        assert a.shape == b.shape == (25, 3, SIZE, SIZE) and torch.equal(la, lb) and torch.equal(sa, sb)
        assert (a.float() - b.float()).abs().mean() < 1.5
    finally:
        (folder / "c0" / "zz_broken.jpg").unlink()


class _Bytes:
    """A one-file source whose ``open`` is the decoder's (the previous path's input)."""

    classes: list[str] = []

    def __init__(self, data: bytes):
        self.data = data

    def __len__(self) -> int:
        return 1

    def label(self, index: int) -> int:
        return -1

    def open(self, index: int) -> Image.Image:
        from eupe.data.decode import decode

        return decode(self.data, "x")
