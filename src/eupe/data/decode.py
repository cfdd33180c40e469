"""The one image decoder of the pipeline: the data scan and training read every file through it.

Raw bytes in, an RGB :class:`PIL.Image.Image` out, or :class:`UndecodableImage` with a short reason:

* decompression bombs are refused from the header alone (``Image.open`` is lazy), before any pixel
  is decoded: a PNG claiming 60000x60000 costs microseconds, not 10 GB;
* the EXIF orientation is applied, so width and height are those of the picture as displayed;
* unusual but valid encodings are converted, not rejected: CMYK, grayscale (``1``, ``L``, ``LA``),
  16- and 32-bit grayscale (``I;16*``, ``I``, ``F``: scaled to 8 bits, never clipped), palette
  images, and transparency (composited over white).
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eupe.errors import EupeError

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_IMAGE_BYTES", "Decoded", "UndecodableImage", "decode", "decode_full", "too_large"]

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own warning limit (~ 13400 x 13400); validation.max_pixels' default
MAX_IMAGE_BYTES = 128 << 20  # one image file (or .tar member) is read whole: a larger one is skipped, never read
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as in a browser
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UndecodableImage(EupeError):
    """A file that is not a usable image; ``reason`` is short ("truncated", "empty file", ...)."""

    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = uri, " ".join(str(reason).split())
        super().__init__(f"{uri}: {self.reason}")


class Decoded:
    """An RGB image and what its file said about itself (format and mode before conversion)."""

    __slots__ = ("image", "format", "mode")

    def __init__(self, image: Image.Image, fmt: str | None, mode: str):
        self.image, self.format, self.mode = image, fmt, mode


def too_large(size: int, limit: int = MAX_IMAGE_BYTES) -> str | None:
    """The reason a file of ``size`` bytes is not read (over ``limit``), or None."""
    return f"{size} bytes, over the {limit}-byte limit of one image file" if size > limit else None


def _reason(exc: Exception) -> str:
    msg = " ".join(str(exc).split())
    if isinstance(exc, EOFError) or re.search(r"truncated|broken|EOF|end of file|premature", msg, re.I):
        return "truncated"
    return f"corrupt: {type(exc).__name__}: {msg}"[:200]


def _gray_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit or float grayscale -> ``L``, scaling the value range instead of clipping it."""
    a = np.asarray(im)
    if im.mode in _SIXTEEN_BIT:
        scaled = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif im.mode == "F" and a.size and np.nanmax(a) <= 1.0:
        scaled = a.astype(np.float64) * 255.0  # float in 0..1
    elif a.size and np.nanmax(a) > 255:
        scaled = np.clip(a.astype(np.float64), 0, 65535) / 257.0  # 16-bit data held in a wider mode
    else:
        scaled = a.astype(np.float64)  # 8-bit data held in a wider mode
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in (*_SIXTEEN_BIT, "I", "F"):
        im = _gray_to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_BACKGROUND, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header through PIL's plugin registry, without PIL's bomb check
    (which hides the size) and without decoding a pixel. Only used to name a refused file."""
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is None or accept(data[:16]) is True:
                return factory(io.BytesIO(data), None).size
        except Exception:  # noqa: BLE001 - best effort, for the message only
            continue
    return None


def decode_full(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """:func:`decode`, also returning the file's format and original mode (for the data manifest)."""
    if not data:
        raise UndecodableImage(uri, "empty file")
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: max_pixels below decides, and the skip is logged
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own hard limit, above any sane max_pixels
        size = _header_size(data)
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        shown = f"{size[0]}x{size[1]}" if size else f"{pixels.group(1) if pixels else '?'} pixels"
        raise UndecodableImage(uri, f"decompression bomb: {shown}") from None
    except UnidentifiedImageError:
        raise UndecodableImage(uri, "not an image") from None
    except Exception as e:  # noqa: BLE001 - a corrupt header can raise anything; it names this file
        raise UndecodableImage(uri, _reason(e)) from None
    width, height = im.size
    if width * height > max_pixels:
        raise UndecodableImage(uri, f"decompression bomb: {width}x{height}")
    if width == 0 or height == 0:
        raise UndecodableImage(uri, f"empty image: {width}x{height}")
    fmt, mode = im.format, im.mode
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - decoder errors are per file, never a crash of the step
        raise UndecodableImage(uri, _reason(e)) from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF: the pixels are fine, keep them as stored
        pass
    try:
        rgb = _to_rgb(im)
    except Exception as e:  # noqa: BLE001
        raise UndecodableImage(uri, f"cannot convert mode {im.mode} to RGB: {_reason(e)}") from None
    return Decoded(rgb, fmt, mode)


def decode(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (the bytes of ``uri``) to an upright RGB image, or raise :class:`UndecodableImage`."""
    return decode_full(data, uri, max_pixels).image
