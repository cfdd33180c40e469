"""eupe.data.decode: known answers for every conversion path, and the exact reason of every refusal."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from image_builders import encode, png_bomb_header
from PIL import Image

from eupe.data import decode as dec
from eupe.data.decode import UndecodableImage, decode, decode_full


def _gray(data: bytes) -> list[int]:
    """The decoded image's pixels as one list of gray values (the three channels must agree)."""
    rgb = np.asarray(decode(data, "x"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0].ravel().tolist()


def _pixels(im: Image.Image) -> list[tuple[int, ...]]:
    assert im.mode == "RGB"
    return [tuple(p) for p in np.asarray(im).reshape(-1, 3).tolist()]


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(UndecodableImage) as err:
        decode(data, "bad.img", **kwargs)
    assert str(err.value) == f"bad.img: {err.value.reason}"
    return err.value.reason


# --------------------------------------------------------------------------- 16- and 32-bit gray


def test_sixteen_bit_divides_by_257_so_full_scale_stays_full_scale() -> None:
    values = np.array([[0, 128, 25700, 65000, 65535]], dtype=np.uint16)  # /256 would give 100.4 and 253.9 -> 254
    d = decode_full(encode(Image.fromarray(values), "PNG"), "g16.png")
    assert (d.mode, d.format) == ("I;16", "PNG")
    assert _gray(encode(Image.fromarray(values), "PNG")) == [0, 0, 100, 253, 255]


@pytest.mark.parametrize(("mode", "dtype"), [("I;16B", ">u2"), ("I;16L", "<u2")])
def test_sixteen_bit_of_either_byte_order_is_scaled_the_same(mode: str, dtype: str) -> None:
    im = Image.frombytes(mode, (4, 1), np.array([0, 257, 65000, 65535], dtype=dtype).tobytes())
    assert _pixels(dec._to_rgb(im)) == [(0, 0, 0), (1, 1, 1), (253, 253, 253), (255, 255, 255)]


def test_thirty_two_bit_values_above_255_are_scaled_as_16_bit_not_clipped() -> None:
    values = np.array([[0, 256, 300, 514, 65535, 70000, -5]], dtype=np.int32)
    assert decode_full(encode(Image.fromarray(values), "TIFF"), "i.tif").mode == "I"
    # /257 below 65535, clipped to 65535 above it, negative to 0
    assert _gray(encode(Image.fromarray(values), "TIFF")) == [0, 1, 1, 2, 255, 255, 0]


def test_thirty_two_bit_values_up_to_255_are_kept_as_they_are_and_from_256_on_scaled() -> None:
    assert _gray(encode(Image.fromarray(np.array([[0, 1, 128, 255]], dtype=np.int32)), "TIFF")) == [0, 1, 128, 255]
    assert _gray(encode(Image.fromarray(np.array([[0, 128, 256]], dtype=np.int32)), "TIFF")) == [0, 0, 1]


def test_float_images_in_0_1_are_scaled_to_255_and_nan_is_black() -> None:
    values = np.array([[0.0, 0.2, 0.5, 0.6, 1.0, np.nan]], dtype=np.float32)
    assert decode_full(encode(Image.fromarray(values), "TIFF"), "f.tif").mode == "F"
    assert _gray(encode(Image.fromarray(values), "TIFF")) == [0, 51, 128, 153, 255, 0]  # x 256 would give 154 for 0.6


def test_float_images_above_1_are_read_as_8_bit_values_rounded_and_clipped_at_0() -> None:
    values = np.array([[-3.0, 1.5, 2.0, 2.4, 200.6]], dtype=np.float32)
    assert _gray(encode(Image.fromarray(values), "TIFF")) == [0, 2, 2, 2, 201]
    assert _gray(encode(Image.fromarray(np.array([[0.0, 1.5, 2.0]], dtype=np.float32)), "TIFF")) == [0, 2, 2]


def test_float_images_above_255_are_scaled_as_16_bit() -> None:
    values = np.array([[0.0, 257.0, 65535.0]], dtype=np.float32)
    assert _gray(encode(Image.fromarray(values), "TIFF")) == [0, 1, 255]


# --------------------------------------------------------------------------- alpha over white


@pytest.mark.parametrize(("mode", "transparent", "half"), [
    ("RGBA", (0, 0, 0, 0), (0, 0, 0, 128)),
    ("LA", (0, 0), (0, 128)),
    ("RGBa", (0, 0, 0, 0), (0, 0, 0, 128)),
])
def test_transparent_pixels_become_white_and_half_transparent_black_becomes_mid_gray(mode, transparent, half) -> None:
    im = Image.new(mode, (2, 1))
    im.putpixel((0, 0), transparent)
    im.putpixel((1, 0), half)
    assert _pixels(dec._to_rgb(im)) == [(255, 255, 255), (127, 127, 127)]


def test_palette_with_an_alpha_channel_is_composited_over_white() -> None:
    im = Image.new("PA", (2, 1))
    im.putpalette([200, 10, 10] * 256)
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 255))
    assert _pixels(dec._to_rgb(im)) == [(255, 255, 255), (200, 10, 10)]


def test_palette_transparency_from_the_file_is_composited_over_white() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert _pixels(decode(encode(pal, "PNG", transparency=0), "p.png")) == [(255, 255, 255), (10, 200, 30)]
    assert _pixels(decode(encode(pal, "PNG"), "p.png")) == [(0, 0, 0), (10, 200, 30)]


def test_rgb_is_returned_as_it_is_and_cmyk_is_converted() -> None:
    im = Image.new("RGB", (1, 1), (1, 2, 3))
    assert dec._to_rgb(im) is im
    d = decode_full(encode(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), "TIFF"), "red.tif")
    assert (d.mode, d.format, d.image.getpixel((0, 0))) == ("CMYK", "TIFF", (255, 0, 0))


# --------------------------------------------------------------------------- refusals


def test_refusals_have_short_exact_reasons() -> None:
    assert _reason(b"") == "empty file"
    assert _reason(b"plain text, not an image") == "not an image"
    assert _reason(png_bomb_header(60000, 60000)) == "decompression bomb: 60000x60000"
    assert _reason(encode(Image.new("RGB", (200, 100)), "PNG"), max_pixels=19_999) == "decompression bomb: 200x100"
    assert decode(encode(Image.new("RGB", (200, 100)), "PNG"), "ok.png", max_pixels=20_000).size == (200, 100)
    assert _reason(encode(Image.new("RGB", (64, 64)), "JPEG")[:300]) == "truncated"


def _tga_header(width: int, height: int) -> bytes:
    """An uncompressed 24-bit TGA header (a format PIL finds by trying its opener: no magic bytes)."""
    return struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, width, height, 24, 0) + bytes(64)


def test_a_bomb_is_named_by_width_and_height_whatever_its_format() -> None:
    assert _reason(png_bomb_header(70000, 50000)) == "decompression bomb: 70000x50000"
    assert _reason(_tga_header(60000, 50000)) == "decompression bomb: 60000x50000"


def test_a_bomb_whose_header_cannot_be_reread_is_named_by_its_pixel_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dec, "_header_size", lambda data: None)
    assert _reason(png_bomb_header(60000, 60000)) == "decompression bomb: 3600000000 pixels"

    def bomb_without_count(fp):
        raise Image.DecompressionBombError("too large")

    monkeypatch.setattr(dec.Image, "open", bomb_without_count)
    assert _reason(png_bomb_header(60000, 60000)) == "decompression bomb: ? pixels"


@pytest.mark.parametrize("size", [(0, 7), (7, 0)])
def test_an_image_without_pixels_is_refused_as_empty(monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]) -> None:
    # PIL itself refuses most zero-sized files; the decoder does not rely on it
    monkeypatch.setattr(dec.Image, "open", lambda fp: Image.new("RGB", size))
    assert _reason(b"any bytes") == f"empty image: {size[0]}x{size[1]}"


def test_header_size_reads_the_claimed_size_without_decoding() -> None:
    assert dec._header_size(png_bomb_header(70000, 50000)) == (70000, 50000)
    assert dec._header_size(_tga_header(60000, 50000)) == (60000, 50000)  # after openers that fail on it
    assert dec._header_size(b"no image format starts like this") is None


def test_a_conversion_failure_names_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(im: Image.Image) -> Image.Image:
        raise ValueError("conversion from La to L not supported")

    monkeypatch.setattr(dec, "_to_rgb", refuse)
    assert _reason(encode(Image.new("L", (4, 4)), "PNG")) == (
        "cannot convert mode L to RGB: corrupt: ValueError: conversion from La to L not supported")


@pytest.mark.parametrize(("exc", "reason"), [
    (EOFError(), "truncated"),
    (OSError("image file is Truncated (3 bytes not processed)"), "truncated"),
    (ValueError("broken data stream"), "truncated"),
    (SyntaxError("unexpected eof"), "truncated"),
    (OSError("reached end of file"), "truncated"),
    (ValueError("Premature end of JPEG"), "truncated"),
    (ValueError("bad\n  huffman   table"), "corrupt: ValueError: bad huffman table"),
])
def test_decoder_errors_are_classified_as_truncated_or_corrupt(exc: Exception, reason: str) -> None:
    assert dec._reason(exc) == reason


def test_a_long_corrupt_reason_is_cut_to_200_characters() -> None:
    out = dec._reason(ValueError("x" * 500))
    assert out == ("corrupt: ValueError: " + "x" * 500)[:200] and len(out) == 200


def test_undecodable_image_normalizes_whitespace_in_its_reason() -> None:
    err = UndecodableImage("s3://b/k.jpg", "  two\n words ")
    assert (err.uri, err.reason, str(err)) == ("s3://b/k.jpg", "two words", "s3://b/k.jpg: two words")
