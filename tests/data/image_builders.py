"""Image files with known content for the data tests: valid unusual encodings and broken files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_bomb_header(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB pixels, followed by a few bytes of IDAT:
    built by hand, so nothing of that size ever exists."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def photo(seed: int, size: tuple[int, int] = (300, 260)) -> Image.Image:
    """A smooth random RGB picture (a colour gradient plus noise), ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    a, b = rng.uniform(40, 215, 3), rng.uniform(-60, 60, 3)
    img = a + b * (xx + yy)[..., None] + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def broken_files(folder: Path, original: Path) -> dict[str, tuple[Path, str]]:
    """Write one of each broken input into ``folder``; ``{name: (path, expected reason fragment)}``.
    ``original`` is an existing image that gets an exact duplicate."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "truncated": ("truncated.jpg", encode(photo(1), "JPEG", quality=95)[:1500], "truncated"),
        "empty": ("empty.jpg", b"", "empty file"),
        "text": ("notes.jpg", b"this is a text file, not a JPEG\n" * 4, "not an image"),
        "tiny": ("tiny.png", encode(photo(2, (10, 10)), "PNG"), "too small: 10x10"),
        "bomb": ("bomb.png", png_bomb_header(), "decompression bomb: 60000x60000"),
        "duplicate": ("copy_of_original" + original.suffix, original.read_bytes(), f"duplicate of {original}"),
    }
    out = {}
    for name, (filename, data, reason) in files.items():
        path = folder / filename
        path.write_bytes(data)
        out[name] = (path, reason)
    return out


def unusual_valid_files(folder: Path) -> dict[str, Path]:
    """Valid images in encodings a careless loader gets wrong, each >= 256 px on its shorter side."""
    folder.mkdir(parents=True, exist_ok=True)
    base = photo(3, (320, 280))
    gray16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    items = {
        "cmyk": ("cmyk.jpg", encode(base.convert("CMYK"), "JPEG", quality=95)),
        "gray": ("gray.jpg", encode(base.convert("L"), "JPEG", quality=95)),
        "gray16": ("gray16.png", encode(gray16, "PNG")),
        "palette": ("palette.png", encode(base.quantize(64), "PNG", transparency=0)),
        "exif_rotated": ("rotated.jpg", encode(photo(4, (360, 300)), "JPEG", quality=95, exif=exif.tobytes())),
    }
    out = {}
    for name, (filename, data) in items.items():
        (folder / filename).write_bytes(data)
        out[name] = folder / filename
    return out
