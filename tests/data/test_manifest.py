"""The safe decoder (eupe.data.decode) and the scan manifest (eupe data scan)."""

from __future__ import annotations

import hashlib
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from image_builders import broken_files, encode, photo, png_bomb_header, unusual_valid_files
from PIL import Image

from eupe import storage
from eupe.cli import main
from eupe.data.decode import UndecodableImage, decode, decode_full
from eupe.data.folder import ImageFolder
from eupe.data.manifest import SCHEMA, STAT_COLUMNS, read_manifest, write_manifest
from eupe.errors import EupeError

# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("name", ["truncated", "empty", "text", "bomb"])
def test_broken_bytes_raise_undecodable_with_a_short_reason(tmp_path, name):
    original = tmp_path / "orig.png"
    original.write_bytes(encode(photo(0), "PNG"))
    path, reason = broken_files(tmp_path / "broken", original)[name]
    with pytest.raises(UndecodableImage) as err:
        decode(path.read_bytes(), str(path))
    assert err.value.reason == reason and err.value.uri == str(path)
    assert isinstance(err.value, EupeError) and str(path) in str(err.value)


def test_decompression_bomb_is_refused_from_the_header_without_decoding():
    data = png_bomb_header(60000, 60000)  # 10.8 GB of RGB if it were decoded
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    start = time.perf_counter()
    with pytest.raises(UndecodableImage, match=r"decompression bomb: 60000x60000"):
        decode(data, "bomb.png")
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # < 100 MiB more


def test_max_pixels_is_the_configured_limit():
    data = encode(photo(0, (200, 100)), "PNG")
    assert decode(data, "ok.png", max_pixels=20_000).size == (200, 100)
    with pytest.raises(UndecodableImage, match=r"decompression bomb: 200x100"):
        decode(data, "big.png", max_pixels=19_999)


def test_unusual_valid_encodings_decode_to_rgb(tmp_path):
    files = unusual_valid_files(tmp_path)
    modes = {}
    for name, path in files.items():
        d = decode_full(path.read_bytes(), str(path))
        assert d.image.mode == "RGB", name
        modes[name] = d.mode
    assert modes == {"cmyk": "CMYK", "gray": "L", "gray16": "I;16", "palette": "P", "exif_rotated": "RGB"}


def test_exif_rotation_swaps_width_and_height():
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, 10, 20))  # blue stripe on the left edge
    out = decode(encode(img, "PNG", exif=exif.tobytes()), "rotated.png")
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[2] > 150  # rotated 90 degrees clockwise: the left edge is now on top


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 40000, 65535]], dtype=np.uint16)
    out = np.asarray(decode(encode(Image.fromarray(values), "PNG"), "g16.png"))
    assert out[0, :, 0].tolist() == [0, 100, round(40000 / 257), 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_grayscale_cmyk_and_palette_keep_their_colours():
    gray = np.asarray(decode(encode(Image.new("L", (8, 8), 77), "PNG"), "l.png"))
    assert (gray == 77).all()
    la = np.asarray(decode(encode(Image.new("LA", (8, 8), (90, 255)), "PNG"), "la.png"))
    assert (la == 90).all()
    cmyk = decode(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"), "red.tif")
    assert cmyk.getpixel((3, 3)) == (255, 0, 0)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    rgb = decode(encode(pal, "PNG", transparency=0), "p.png")
    assert rgb.getpixel((0, 0)) == (0, 0, 255)  # opaque palette entry: its colour
    assert rgb.getpixel((5, 5)) == (255, 255, 255)  # transparent entry: composited over white


# --------------------------------------------------------------------------- manifest


def _folder_with_known_images(root: Path) -> dict[str, Path]:
    (root / "solid").mkdir(parents=True)
    (root / "split").mkdir()
    files = {"red": root / "solid" / "red.png", "white": root / "solid" / "white.png",
             "half": root / "split" / "half.png"}
    Image.new("RGB", (30, 20), (255, 0, 51)).save(files["red"])
    Image.new("RGB", (16, 16), (255, 255, 255)).save(files["white"])
    half = np.zeros((10, 20, 3), np.uint8)
    half[:, 10:] = (255, 255, 255)
    half[:, 10:, 2] = 0  # blue is black on both halves
    Image.fromarray(half).save(files["half"])
    return files


def test_manifest_statistics_are_exact_on_known_images(tmp_path):
    files = _folder_with_known_images(tmp_path / "data")
    write_manifest(ImageFolder(tmp_path / "data"), tmp_path / "m.parquet", workers=2, progress=False)
    df = read_manifest(tmp_path / "m.parquet").set_index("uri")
    red, white, half = (df.loc[str(files[k])] for k in ("red", "white", "half"))
    assert (red.mean_r, red.mean_g, red.mean_b) == (1.0, 0.0, 51 / 255)
    assert red[["std_r", "std_g", "std_b"]].tolist() == [0.0, 0.0, 0.0]
    assert white[list(STAT_COLUMNS)].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert half.mean_r == pytest.approx(0.5) and half.std_r == pytest.approx(0.5)  # half 0, half 1
    assert half.mean_b == 0.0 and half.std_b == 0.0
    assert (red.width, red.height, red["mode"], red.format, red.label) == (30, 20, "RGB", "PNG", "solid")
    assert red.bytes == files["red"].stat().st_size
    assert red.sha256 == hashlib.sha256(files["red"].read_bytes()).hexdigest()
    assert red.decodable and pd.isna(red.error) and pd.isna(red.domain)


def test_manifest_records_unusual_encodings_and_broken_files_without_crashing(tmp_path):
    root = tmp_path / "data"
    valid = unusual_valid_files(root / "ok")
    broken = broken_files(root / "bad", valid["gray"])
    vanished = root / "bad" / "vanished.jpg"  # listed, then gone before it is read (like a deleted S3 key)
    vanished.write_bytes(b"x")
    source = ImageFolder(root)
    vanished.unlink()
    write_manifest(source, tmp_path / "m.parquet", workers=2, batch_rows=3, progress=False)
    df = read_manifest(tmp_path / "m.parquet").set_index("uri")
    assert len(df) == len(source) == len(valid) + len(broken) + 1
    assert df.loc[[str(p) for p in valid.values()], "decodable"].all()
    assert df.loc[str(valid["exif_rotated"]), ["width", "height"]].tolist() == [300, 360]  # as displayed
    for name in ("truncated", "empty", "text", "bomb"):
        path, reason = broken[name]
        assert not df.loc[str(path), "decodable"] and df.loc[str(path), "error"] == reason, name
        assert np.isnan(df.loc[str(path), "mean_r"])
    assert df.loc[str(broken["empty"][0]), "bytes"] == 0
    assert df.loc[str(vanished), "error"].startswith("unreadable: ") and "No such file" in df.loc[str(vanished), "error"]
    assert df.loc[str(broken["duplicate"][0]), "sha256"] == df.loc[str(valid["gray"]), "sha256"]


def test_manifest_is_streamed_in_source_order_with_the_declared_schema(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(11):
        photo(i, (20 + i, 16)).save(root / f"{i:02d}.png")
    source = ImageFolder(root)
    write_manifest(source, tmp_path / "m.parquet", workers=3, batch_rows=4, progress=False)
    pf = pq.ParquetFile(tmp_path / "m.parquet")
    assert pf.schema_arrow == SCHEMA and pf.metadata.num_row_groups >= 3  # written in batches
    df = pf.read().to_pandas()
    assert df["uri"].tolist() == [source.uri(i) for i in range(len(source))]
    assert df["width"].tolist() == [20 + i for i in range(11)] and df["label"].isna().all()
    assert not list(tmp_path.glob(".m.parquet.tmp-*"))


def test_scan_cli_writes_manifest_and_result(tmp_path, tiny_data, capsys):
    out = tmp_path / "scan"
    assert main(["data", "scan", "--data", str(tiny_data), "--out", str(out), "--workers", "2"]) == 0
    result = storage.read_result(out)  # artifact paths resolved (written relative to result.json)
    assert result["step"] == "data-scan" and result["metrics"]["images"] == 64
    assert result["metrics"]["undecodable"] == 0 and result["metrics"]["images_per_s"] > 0
    df = read_manifest(result["artifacts"]["manifest"])
    assert len(df) == 64 and set(df["label"]) == {"circle", "square", "triangle", "ring"}


def test_scan_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "scan", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eupe: error: ") and "no images in" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "out").exists()


def test_scan_reads_webdataset_shards_like_the_folder_they_hold(tmp_path, tiny_data):
    from eupe.data.sources import write_shards

    write_shards(ImageFolder(tiny_data), tmp_path / "shards", per_shard=20)
    assert main(["data", "scan", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "scan")]) == 0
    shards = read_manifest(tmp_path / "scan" / "manifest.parquet")
    write_manifest(ImageFolder(tiny_data), tmp_path / "folder.parquet", workers=2, progress=False)
    folder = read_manifest(tmp_path / "folder.parquet")
    assert len(shards) == 64 and shards["decodable"].all() and shards["uri"].str.contains(r"\.tar#").all()
    assert sorted(shards["sha256"]) == sorted(folder["sha256"])
    assert shards["label"].value_counts().to_dict() == {"0": 16, "1": 16, "2": 16, "3": 16}  # numeric .cls


def test_shards_without_a_sample_into_an_earlier_scan_keep_it_whole(tmp_path, tiny_data, capsys):
    """.tar shards that hold no sample are refused before --out is touched: an earlier scan there stays byte for
    byte, with no claim left."""
    import tarfile

    out = tmp_path / "scan"
    assert main(["data", "scan", "--data", str(tiny_data), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = tmp_path / "shards"
    empty.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        tarfile.open(empty / name, "w").close()
    capsys.readouterr()
    assert main(["data", "scan", "--data", str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"eupe: error: no images in {empty}: its .tar shards hold no sample"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
