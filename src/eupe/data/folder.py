"""Image sources. Today: an image folder on local disk (class = first-level subfolder, optional).
The data step extends ``open_source`` to ``s3://`` prefixes and WebDataset shards."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image

from eupe.errors import EupeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageSource(Protocol):
    """Random access to images and their labels (-1 when unknown)."""

    classes: list[str]

    def __len__(self) -> int: ...
    def uri(self, index: int) -> str: ...
    def label(self, index: int) -> int: ...
    def open(self, index: int) -> Image.Image: ...


class ImageFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise EupeError(f"dataset folder not found: {self.root}")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise EupeError(f"no images in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.files = files
        top = [p.relative_to(self.root).parts for p in files]
        self.classes = sorted({parts[0] for parts in top if len(parts) > 1})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[parts[0]] if len(parts) > 1 else -1 for parts in top]

    def __len__(self) -> int:
        return len(self.files)

    def uri(self, index: int) -> str:
        return str(self.files[index])

    def label(self, index: int) -> int:
        return self.labels[index]

    def open(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as im:
            return im.convert("RGB")


def open_source(uri: str | Path) -> ImageSource:
    uri = str(uri)
    if uri.startswith("s3://"):
        raise EupeError(f"{uri}: s3 image sources are not supported yet; copy the folder locally")
    return ImageFolder(uri)
