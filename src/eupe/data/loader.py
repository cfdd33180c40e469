"""Deterministic, resumable, rank-aware batches for distillation.

Sample ``p`` of the run (``p = step * global_batch + offset``) is image ``perm_e[p % n]`` of epoch
``e = p // n`` with augmentation seeded by ``(seed, p)``. The data seen at any step is a pure function
of ``(seed, step)``: a resumed run and a run on any number of ranks see the same images.

Training crops are cut while decoding (:func:`augment_bytes`): the random-resized-crop box is drawn
from the size in the file's header, and a JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft
mode) when the box keeps at least the output's resolution there; box, scale/ratio ranges and flip are
drawn exactly as ``torchvision``'s ``RandomResizedCrop`` + flip on the whole image (same seed, same
box), and the box is resized bilinear with antialiasing as before. An upright RGB JPEG is decoded straight
into an RGBX array whose crop is a view (no copy of the crop), resized on its four channels (torch's uint8
kernel pads RGB to four anyway: the same values), the padding dropped. ``fast=False`` keeps the previous
path (whole image decoded, crop on a tensor) for ``benchmarks/data_throughput.py``'s "before".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from eupe.data.decode import decode_crop_pixels
from eupe.data.folder import ImageFolder, ImageSource
from eupe.data.sources import Mixture, S3ImageFolder, read_sample

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, position: int) -> int:
    return (seed * 1_000_003 + position * _MIX) % (2**63 - 1)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of ``(image index, augmentation seed)`` for steps ``[start_step, total_steps)``."""

    def __init__(self, n: int, global_batch: int, micro_batch: int, start_step: int, total_steps: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        per_rank = global_batch // world_size
        if per_rank * world_size != global_batch or per_rank % micro_batch:
            raise ValueError(f"global batch {global_batch} must split into {world_size} ranks x micro batches of {micro_batch}")
        self.n, self.global_batch, self.micro, self.per_rank = n, global_batch, micro_batch, per_rank
        self.start, self.total, self.seed, self.rank = start_step, total_steps, seed, rank
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][position % self.n])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            first = step * self.global_batch + self.rank * self.per_rank
            positions = range(first, first + self.per_rank)
            for i in range(0, self.per_rank, self.micro):
                yield [(self._index(p), sample_seed(self.seed, p)) for p in positions[i : i + self.micro]]

    def __len__(self) -> int:
        return (self.total - self.start) * (self.per_rank // self.micro)


# RandomResizedCrop's default ratio range as it computes it (float32 logs), held as Python floats: the same
# doubles reach ``uniform_`` without indexing a tensor per draw
_LOG_RATIO = tuple(float(v) for v in torch.log(torch.tensor([3 / 4, 4 / 3])))


def crop_params(seed: int, height: int, width: int, scale: Sequence[float] = (0.35, 1.0),
                hflip: bool = True) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, flip)`` of sample ``seed`` on a ``height`` x ``width`` image: ``torchvision``'s
    ``RandomResizedCrop.get_params`` (ratio 3/4..4/3) then a fair coin for the flip, draw for draw as under
    ``torch.manual_seed(seed)``, from a generator of its own: ``manual_seed`` also queues a seed for every
    lazily initialised accelerator (a stack trace each), a millisecond per sample."""
    g = torch.Generator().manual_seed(seed)
    area = height * width
    for _ in range(10):  # torchvision's loop, same draws in the same order
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(_LOG_RATIO[0], _LOG_RATIO[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            break
    else:  # torchvision's fallback: the central crop at the nearest allowed ratio
        in_ratio = width / height
        if in_ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif in_ratio > 4 / 3:
            w, h = int(round(height * (4 / 3))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = hflip and bool(torch.rand((), generator=g) < 0.5)
    return top, left, h, w, flip


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[C, H, W]`` view (channels-last in memory, no copy) of ``[H, W, C]`` pixels. Read-only memory
    (Pillow's bytes) is only ever read here, as a resize's input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable tensor": it is only read
        return torch.from_numpy(pixels).permute(2, 0, 1)


def _resized(crop: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    """The crop resized to ``size`` x ``size`` and flipped as the previous path did (``TF.resized_crop``).
    A 4-channel (RGBX) crop is resized as is (torch's uint8 kernel works on 4 channels anyway, so the RGB
    values are the same bit for bit) and the padding channel dropped."""
    out = TF.resize(crop, [size, size], antialias=True)
    if out.shape[0] == 4:
        out = out[:3]
    return TF.horizontal_flip(out) if flip else out


def augment_bytes(data: bytes, uri: str, max_pixels: int, seed: int, size: int,
                  scale: Sequence[float] = (0.35, 1.0), hflip: bool = True, draft: bool = True) -> torch.Tensor:
    """The training crop of an undecoded file: uint8 ``[3, size, size]``, decoded no larger than the crop
    needs and, for an upright RGB JPEG, straight into the array the crop is a view of
    (:func:`eupe.data.decode.decode_crop_pixels`); :class:`UndecodableImage` as :func:`decode`."""
    flip = False

    def crop(height: int, width: int) -> tuple[int, int, int, int]:
        nonlocal flip
        top, left, h, w, flip = crop_params(seed, height, width, scale, hflip)
        return top, left, h, w

    pixels, _ = decode_crop_pixels(data, uri, size, crop, max_pixels, draft)
    return _resized(_chw(pixels), size, flip)


def augment_image(image: Image.Image, seed: int, size: int, scale: Sequence[float] = (0.35, 1.0),
                  hflip: bool = True) -> torch.Tensor:
    """The training crop of a decoded RGB image (only the box leaves Pillow), as :func:`augment_bytes`."""
    top, left, h, w, flip = crop_params(seed, image.height, image.width, scale, hflip)
    return _resized(_chw(np.asarray(image.crop((left, top, left + w, top + h)))), size, flip)


def _file_source(source: ImageSource, index: int) -> tuple[ImageFolder | S3ImageFolder, int] | None:
    """The folder holding image ``index`` (through mixtures) when its ``open`` is ``decode(read_bytes)``."""
    while isinstance(source, Mixture):
        k, index = source.locate(index)
        source = source.sources[k]
    if type(source).open in (ImageFolder.open, S3ImageFolder.open):
        return source, index
    return None


class DistillImages(Dataset):
    """uint8 ``[3, S, S]`` crops: random-resized crop + flip for training, resize + centre crop otherwise.

    ``fast`` (training): the crop is cut while decoding (:func:`augment_bytes`); False: the whole image is
    decoded and cropped as a tensor (the previous path, same distribution, kept for the benchmark)."""

    def __init__(self, source: ImageSource, size: int, crop_scale: tuple[float, float] = (0.35, 1.0),
                 hflip: bool = True, train: bool = True, fast: bool = True):
        self.source, self.size, self.scale, self.hflip, self.train = source, size, crop_scale, hflip, train
        self.fast = fast

    def __len__(self) -> int:
        return len(self.source)

    def _crop_file(self, index: int, seed: int) -> torch.Tensor | None:
        found = _file_source(self.source, index)
        if found is None:
            return None
        folder, i = found
        return augment_bytes(folder.read_bytes(i), folder.uri(i), folder.max_pixels, seed, self.size, self.scale,
                             self.hflip)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, int, int]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        if self.train and self.fast:
            def open_(i: int) -> torch.Tensor:
                out = self._crop_file(i, seed)
                return out if out is not None else augment_image(self.source.open(i), seed, self.size, self.scale,
                                                                  self.hflip)

            return read_sample(self.source, index, open_image=open_)  # undecodable: the next image, counted
        image, label, skipped = read_sample(self.source, index)  # undecodable: the next image, counted
        img = TF.pil_to_tensor(image)
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), [3 / 4, 4 / 3])
                flip = self.hflip and bool(torch.rand(()) < 0.5)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if flip:
                img = TF.horizontal_flip(img)
        else:
            img = TF.center_crop(TF.resize(img, self.size, antialias=True), [self.size, self.size])
        return img, label, skipped


def step_loader(source: ImageSource, size: int, sampler: StepBatchSampler, num_workers: int,
                crop_scale: tuple[float, float] = (0.35, 1.0), hflip: bool = True, pin_memory: bool = False,
                fast: bool = True) -> DataLoader:
    dataset = DistillImages(source, size, crop_scale, hflip, train=True, fast=fast)
    # Its own generator: starting the workers must not draw from the global RNG, which a resumed run
    # restores from the checkpoint (dropout, drop-path) and which must match an uninterrupted run's.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(sampler.seed))
