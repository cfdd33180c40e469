"""Evaluation data: a deterministic train/held-out split of an image folder and its dense labels.

Layout (the same for synthetic and real data, see README "Evaluation data layout"): an image
``<dir>/<name>.<ext>`` may have ``<dir>/<name>.mask.png`` (single-channel index mask, same size as the
image) and ``<dir>/<name>.depth.png`` (16-bit, millimetres, 0 = no measurement). A label kind is used
when every selected image has it; images are resized (shorter side) and centre-cropped exactly as
``DistillImages`` does for evaluation, labels with nearest-neighbour sampling, then brought to
``label_size``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from eupe import storage
from eupe.data.folder import DEPTH_SUFFIX, MASK_SUFFIX, ImageSource, label_uri, open_source
from eupe.data.loader import DistillImages
from eupe.errors import EupeError

if TYPE_CHECKING:
    from eupe.config import Config

MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class Split:
    train: list[int]
    heldout: list[int]


def open_image_folder(root: str, purpose: str) -> ImageSource:
    """``data.root`` as an indexable image folder (local or s3://); ``.tar`` shards (a stream) are refused:
    evaluation and export need the same images, by index, on every run."""
    source = open_source(root)
    if not hasattr(source, "uri"):
        raise EupeError(f"data {root}: {purpose} needs an image folder (local or s3://), not a stream of .tar shards")
    return source


def split(n: int, max_images: int, heldout_fraction: float, seed: int) -> Split:
    """At most ``max_images`` of ``n`` images drawn with ``seed``; ``heldout_fraction`` of them held out."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[: min(n, max_images)].tolist()
    if len(chosen) < 2:
        raise EupeError(f"evaluation needs at least 2 images (a train and a held-out one), the dataset has {n}")
    held = min(len(chosen) - 1, max(1, round(len(chosen) * heldout_fraction)))
    return Split(train=sorted(chosen[held:]), heldout=sorted(chosen[:held]))


def recipe_split(n: int, cfg: Config) -> Split:
    """The recipe's split of ``n`` images: what evaluation holds out (drawn with ``eval.split_seed``, else the
    recipe's seed), which the teacher zoo must never train on."""
    return split(n, cfg.eval.max_images, cfg.eval.heldout_fraction, cfg.eval.split_seed_for(cfg.seed))


def _open(uri: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(storage.read_bytes(uri)))
    except OSError as e:
        raise EupeError(f"cannot decode {uri}: {e}") from None


def available_labels(source: ImageSource, indices: list[int]) -> dict[str, bool]:
    """Which dense labels the selected images carry, checked (presence, mode, size) before any compute.

    A kind present for some images but not all is an error naming the first image without it."""
    found = {}
    for kind, suffix, modes in (("mask", MASK_SUFFIX, MASK_MODES), ("depth", DEPTH_SUFFIX, DEPTH_MODES)):
        uris = [label_uri(source.uri(i), suffix) for i in indices]
        have = [storage.exists(u) for u in uris]
        if any(have) and not all(have):
            missing = uris[have.index(False)]
            raise EupeError(f"{sum(have)} of {len(uris)} images have a {suffix} label but not all: missing {missing}")
        found[kind] = all(have)
        if not found[kind]:
            continue
        for i, uri in zip(indices, uris):
            with _open(uri) as label:
                if label.mode not in modes:
                    what = "16-bit PNG in millimetres" if kind == "depth" else "single-channel index PNG"
                    raise EupeError(f"{uri}: {kind} label must be a {what}, got PIL mode {label.mode!r}")
                try:
                    with Image.open(io.BytesIO(source.read_bytes(i))) as image:
                        size = image.size
                except OSError:
                    continue  # an undecodable image is passed over by the loader (read_sample), labels and all
                if label.size != size:
                    raise EupeError(f"{uri}: {kind} label is {label.size[0]}x{label.size[1]}, its image "
                                    f"{source.uri(i)} is {size[0]}x{size[1]}")
    return found


def _fit_label(label: torch.Tensor, size: int, label_size: int) -> torch.Tensor:
    """[H, W] -> [L, L] with the image's resize + centre crop, nearest-neighbour (no mixed classes/depths)."""
    x = TF.resize(label[None], size, interpolation=InterpolationMode.NEAREST)
    x = TF.center_crop(x, [size, size])
    if label_size != size:
        x = TF.resize(x, [label_size, label_size], interpolation=InterpolationMode.NEAREST)
    return x[0]


class EvalImages(Dataset):
    """``{"image": uint8 [3, S, S], "label": int, "skipped": int, "mask": int64 [L, L], "depth": float32 metres
    [L, L]}`` (mask/depth only when present; ``skipped`` counts undecodable files passed over)."""

    def __init__(self, source: ImageSource, indices: list[int], size: int, label_size: int, labels: dict[str, bool]):
        self.source, self.indices, self.labels = source, indices, labels
        self.images = DistillImages(source, size, train=False)
        self.size, self.label_size = size, min(label_size, size)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, index: int, suffix: str) -> torch.Tensor:
        with _open(label_uri(self.source.uri(index), suffix)) as im:
            return torch.from_numpy(np.asarray(im).astype(np.int64))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        image, label, skipped = self.images[self.indices[i]]
        # An image that does not decode is replaced by the next one that does (``read_sample``): its labels follow.
        index = (self.indices[i] + skipped) % len(self.source)
        item: dict[str, torch.Tensor | int] = {"image": image, "label": label, "skipped": skipped}
        if self.labels.get("mask"):
            item["mask"] = _fit_label(self._read(index, MASK_SUFFIX), self.size, self.label_size)
        if self.labels.get("depth"):
            mm = _fit_label(self._read(index, DEPTH_SUFFIX), self.size, self.label_size)
            item["depth"] = mm.float() / 1000.0
        return item
