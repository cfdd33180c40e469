"""The one image decoder of the pipeline: the data scan and training read every file through it.

Raw bytes in, an RGB :class:`PIL.Image.Image` out, or :class:`UndecodableImage` with a short reason:

* decompression bombs are refused from the header alone (``Image.open`` is lazy), before any pixel
  is decoded: a PNG claiming 60000x60000 costs microseconds, not 10 GB;
* the EXIF orientation is applied, so width and height are those of the picture as displayed;
* unusual but valid encodings are converted, not rejected: CMYK, grayscale (``1``, ``L``, ``LA``),
  16- and 32-bit grayscale (``I;16*``, ``I``, ``F``: scaled to 8 bits, never clipped), palette
  images, and transparency (composited over white).

:func:`decode_crop` is the training path: the crop is chosen from the header's size, and a JPEG
is decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) when the crop still has every pixel the
output keeps; the same refusals apply, from the full size in the header. :func:`decode_crop_pixels` is the
same crop as an array: an upright RGB JPEG is decoded by Pillow's JPEG decoder straight into a numpy RGBX
buffer and the crop is a view of it (no copy of the crop, none out of Pillow), bit for bit Pillow's pixels.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from eupe.errors import EupeError

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_IMAGE_BYTES", "Decoded", "UndecodableImage", "decode", "decode_full",
           "decode_crop", "decode_crop_pixels", "draft_scale", "too_large"]

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own warning limit (~ 13400 x 13400); validation.max_pixels' default
MAX_IMAGE_BYTES = 128 << 20  # one image file (or .tar member) is read whole: a larger one is skipped, never read
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as in a browser
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads


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


def _open(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """The lazily opened image (header only), refused when it is empty, not an image or over ``max_pixels``."""
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
    return im


def _load_rgb(im: Image.Image, uri: str) -> Image.Image:
    """Decode the pixels of an opened image, apply its EXIF orientation and convert it to RGB."""
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - decoder errors are per file, never a crash of the step
        raise UndecodableImage(uri, _reason(e)) from None
    try:  # in place: an upright image is not copied (the returning form copies it whole)
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001 - malformed EXIF: the pixels are fine, keep them as stored
        pass
    try:
        return _to_rgb(im)
    except Exception as e:  # noqa: BLE001
        raise UndecodableImage(uri, f"cannot convert mode {im.mode} to RGB: {_reason(e)}") from None


def decode_full(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """:func:`decode`, also returning the file's format and original mode (for the data manifest)."""
    im = _open(data, uri, max_pixels)
    fmt, mode = im.format, im.mode
    return Decoded(_load_rgb(im, uri), fmt, mode)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: exif_transpose keeps the pixels as stored too
        return 1


def draft_scale(width: int, height: int, crop: tuple[int, int], size: int, exact: bool = False) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) at which a ``crop`` (height, width) of a ``width`` x ``height``
    image still has at least ``size`` pixels on each side: decoding at 1/scale then loses nothing that
    the resize to ``size`` keeps. ``exact``: also require both sides to divide by the scale (a flipped or
    rotated image, whose reduced pixel grid must line up with the original's from either edge)."""
    for scale in (8, 4, 2):
        if min(crop) >= scale * size and (not exact or (width % scale == 0 and height % scale == 0)):
            return scale
    return 1


def _plan_crop(data: bytes, uri: str, size: int, crop: Callable[[int, int], tuple[int, int, int, int]],
               max_pixels: int, draft: bool) -> tuple[Image.Image, int, tuple[int, int, int, int], int]:
    """The opened image (header only, draft applied), its EXIF orientation, the crop box ``(left, top, right,
    bottom)`` on the image as it will be decoded (upright, reduced by the scale), and the scale."""
    im = _open(data, uri, max_pixels)
    width, height = im.size
    stored_width = width
    orientation = _orientation(im)
    if orientation in (5, 6, 7, 8):  # exif_transpose swaps the sides
        width, height = height, width
    top, left, h, w = crop(height, width)
    scale = draft_scale(width, height, (h, w), size, exact=orientation != 1) if draft and im.format == "JPEG" else 1
    if scale > 1:
        try:  # libjpeg decodes pixel x of the reduced image from pixels [x * scale, (x + 1) * scale)
            drafted = im.draft("RGB", (im.size[0] // scale, im.size[1] // scale))
        except Exception:  # noqa: BLE001 - a JPEG that refuses the reduced decode is decoded whole
            drafted = None
        scale = round(stored_width / drafted[1][2]) if drafted else 1  # the scale libjpeg was given, or 1
    if scale > 1:  # the reduced image is ceil(side / scale) pixels: orientation only swaps the sides
        reduced_w, reduced_h = im.size if orientation not in (5, 6, 7, 8) else im.size[::-1]
        right, bottom = min(round((left + w) / scale), reduced_w), min(round((top + h) / scale), reduced_h)
        return im, orientation, (round(left / scale), round(top / scale), right, bottom), scale
    return im, orientation, (left, top, left + w, top + h), 1


def decode_crop(data: bytes, uri: str, size: int, crop: Callable[[int, int], tuple[int, int, int, int]],
                max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True) -> tuple[Image.Image, int]:
    """A crop of ``data`` as an RGB image, the file decoded no larger than a ``size``-pixel output needs.

    ``crop(height, width)`` gets the size of the upright image (EXIF orientation applied) from the header
    and returns the box ``(top, left, height, width)`` to cut. With ``draft``, a JPEG whose box has at least
    ``2 * size`` pixels on its shorter side is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling
    (Pillow's draft mode), and the box is mapped onto the reduced image (rounded to its pixels: a shift
    under half a reduced pixel). Returns ``(the cut, scale)``; the same refusals as :func:`decode`.
    """
    im, _, box, scale = _plan_crop(data, uri, size, crop, max_pixels, draft)
    rgb = _load_rgb(im, uri)
    try:
        return rgb.crop(box), scale
    except Exception as e:  # noqa: BLE001
        raise UndecodableImage(uri, _reason(e)) from None


def _decode_rgbx(im: Image.Image, data: bytes, uri: str) -> np.ndarray | None:
    """The pixels of an opened plain RGB JPEG (one tile, draft applied) decoded by Pillow's own JPEG decoder
    straight into a ``[H, W, 4]`` uint8 array (RGBX, Pillow's in-memory layout of RGB), which the caller then
    slices: no copy out of Pillow, no crop copy. None for anything else (the caller decodes it as before).
    The bytes are those ``ImageFile.load`` would feed the same decoder, so are the pixels and the refusals:
    bytes ending before the image does are "truncated", a decoder error the reason its load gives."""
    if im.format != "JPEG" or im.mode != "RGB" or len(im.tile) != 1 or im.tile[0][0] != "jpeg":
        return None
    name, extents, offset, args = im.tile[0]
    width, height = im.size
    pixels = np.empty((height, width, 4), np.uint8)
    target = Image.frombuffer("RGBX", (width, height), pixels, "raw", "RGBX", 0, 1)  # Pillow's view of the array
    # Pillow's own plugin API (what ImageFile.load calls); outside the try below: were it to change, every
    # image would fail here loudly rather than be skipped as undecodable.
    decoder = Image._getdecoder("RGBX", name, args, im.decoderconfig)
    decoder.setimage(target.im, extents)  # the decoder writes into the array's memory, all of it
    try:
        consumed, err = decoder.decode(memoryview(data)[offset:])  # the whole file at once: no chunking
    except Exception as e:  # noqa: BLE001 - decoder errors are per file, never a crash of the step
        raise UndecodableImage(uri, _reason(e)) from None
    finally:
        decoder.cleanup()
    if consumed >= 0:  # the decoder wants more bytes than the file has
        raise UndecodableImage(uri, "truncated")
    if err < 0:
        raise UndecodableImage(uri, _reason(ImageFile._get_oserror(err, encoder=False)))
    return pixels


def decode_crop_pixels(data: bytes, uri: str, size: int, crop: Callable[[int, int], tuple[int, int, int, int]],
                       max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True) -> tuple[np.ndarray, int]:
    """:func:`decode_crop` as a uint8 ``[h, w, C]`` array: the same box, scale, pixels and refusals. An upright
    RGB JPEG is decoded straight into an array and the box is a view of it (``C`` = 4, RGBX: the fourth
    channel is padding); any other file goes through :func:`decode_crop` (``C`` = 3, read-only)."""
    im, orientation, box, scale = _plan_crop(data, uri, size, crop, max_pixels, draft)
    pixels = _decode_rgbx(im, data, uri) if orientation == 1 else None
    if pixels is not None:
        left, top, right, bottom = box
        return pixels[top:bottom, left:right], scale
    rgb = _load_rgb(im, uri)
    try:
        return np.asarray(rgb.crop(box)), scale
    except Exception as e:  # noqa: BLE001
        raise UndecodableImage(uri, _reason(e)) from None


def decode(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (the bytes of ``uri``) to an upright RGB image, or raise :class:`UndecodableImage`."""
    return decode_full(data, uri, max_pixels).image
