"""Deterministic, resumable, rank-aware batches for distillation.

Sample ``p`` of the run (``p = step * global_batch + offset``) is image ``perm_e[p % n]`` of epoch
``e = p // n`` with augmentation seeded by ``(seed, p)``. The data seen at any step is a pure function
of ``(seed, step)``: a resumed run and a run on any number of ranks see the same images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from eupe.data.folder import ImageSource
from eupe.data.sources import read_sample

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


class DistillImages(Dataset):
    """uint8 ``[3, S, S]`` crops: random-resized crop + flip for training, resize + centre crop otherwise."""

    def __init__(self, source: ImageSource, size: int, crop_scale: tuple[float, float] = (0.35, 1.0),
                 hflip: bool = True, train: bool = True):
        self.source, self.size, self.scale, self.hflip, self.train = source, size, crop_scale, hflip, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, int, int]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
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
                crop_scale: tuple[float, float] = (0.35, 1.0), hflip: bool = True, pin_memory: bool = False) -> DataLoader:
    dataset = DistillImages(source, size, crop_scale, hflip, train=True)
    # Its own generator: starting the workers must not draw from the global RNG, which a resumed run
    # restores from the checkpoint (dropout, drop-path) and which must match an uninterrupted run's.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(sampler.seed))
