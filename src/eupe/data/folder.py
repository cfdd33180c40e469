"""Image sources: the ``ImageSource`` protocol and the local image folder (class = first-level subfolder,
optional). ``open_source`` also opens ``s3://`` prefixes and WebDataset shards (``eupe.data.sources``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image

from eupe.data.decode import DEFAULT_MAX_PIXELS, UndecodableImage, decode, too_large
from eupe.errors import EupeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Dense labels live next to their image: ``<stem>.mask.png`` (index mask) and ``<stem>.depth.png``
# (16-bit, millimetres, 0 = no measurement). They are labels, never images.
MASK_SUFFIX = ".mask.png"
DEPTH_SUFFIX = ".depth.png"
LABEL_SUFFIXES = (MASK_SUFFIX, DEPTH_SUFFIX)


def label_uri(image_uri: str, suffix: str) -> str:
    """``a/b/000001.jpg`` -> ``a/b/000001.mask.png`` (or ``.depth.png``)."""
    folder, slash, name = image_uri.rpartition("/")
    return folder + slash + name.rsplit(".", 1)[0] + suffix


class ImageSource(Protocol):
    """Random access to images and their labels (-1 when unknown)."""

    classes: list[str]

    def __len__(self) -> int: ...
    def uri(self, index: int) -> str: ...
    def label(self, index: int) -> int: ...
    def open(self, index: int) -> Image.Image: ...
    def read_bytes(self, index: int) -> bytes: ...  # the raw file, for hashing and safe decoding
    def domain(self, index: int) -> str | None: ...  # e.g. the mixture component; None when unknown


def is_image(name: str) -> bool:
    """An image file by its name, not one of the label files stored beside images."""
    name = name.lower()
    return name.endswith(IMAGE_SUFFIXES) and not name.endswith(LABEL_SUFFIXES)


def class_labels(relative: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Class = first-level folder of each relative path (files at the top level have label -1)."""
    classes = sorted({parts[0] for parts in relative if len(parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[parts[0]] if len(parts) > 1 else -1 for parts in relative]


class ImageFolder:
    """``max_pixels``: the decoder's limit (``validation.max_pixels``); larger images are skipped undecoded."""

    def __init__(self, root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels
        self.root = Path(root)
        if not self.root.is_dir():
            raise EupeError(f"dataset folder not found: {self.root}")
        files = sorted(p for p in self.root.rglob("*") if is_image(p.name) and p.is_file())
        if not files:
            raise EupeError(f"no images in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.files = files
        self.classes, self.labels = class_labels([p.relative_to(self.root).parts for p in files])

    def __len__(self) -> int:
        return len(self.files)

    def uri(self, index: int) -> str:
        return str(self.files[index])

    def label(self, index: int) -> int:
        return self.labels[index]

    def open(self, index: int) -> Image.Image:
        return decode(self.read_bytes(index), self.uri(index), self.max_pixels)

    def read_bytes(self, index: int) -> bytes:
        """The file's bytes; :class:`~eupe.data.decode.UndecodableImage` for a file too large to read whole."""
        path = self.files[index]
        reason = too_large(path.stat().st_size)
        if reason:
            raise UndecodableImage(str(path), reason)
        return path.read_bytes()

    def domain(self, index: int) -> str | None:
        return None


def open_source(uri: str | Path):
    """A local folder or ``s3://`` prefix of images (an ``ImageSource``), or ``.tar`` shards (a glob, one
    shard, or a folder/prefix of them: an ``eupe.data.sources.ShardStream``). See ``eupe.data.sources``."""
    from eupe.data.sources import open_uri

    return open_uri(uri)
