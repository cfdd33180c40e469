"""The normalization batch: stratified by (domain, class) from the manifest, without outliers."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors import safe_open

from eupe.cli import main
from eupe.data.manifest import STAT_COLUMNS
from eupe.data.norm_batch import allocate, select_normalization_batch, strata_counts


def _manifest(strata: dict[tuple[str | None, str | None], int], seed: int = 0) -> pd.DataFrame:
    """Rows with ordinary random colour statistics, ``n`` per (domain, label)."""
    rng = np.random.default_rng(seed)
    rows = []
    for (domain, label), n in strata.items():
        for _ in range(n):
            means, stds = rng.uniform(0.2, 0.8, 3), rng.uniform(0.08, 0.2, 3)
            rows.append({"uri": f"img{len(rows):04d}.jpg", "decodable": True, "domain": domain, "label": label,
                         **dict(zip(STAT_COLUMNS, [*means, *stds]))})
    return pd.DataFrame(rows)


def test_allocate_is_proportional_and_keeps_every_stratum():
    assert allocate([40, 20, 10, 10], 16) == [8, 4, 2, 2]
    assert allocate([97, 1, 2], 10) == [8, 1, 1]  # one per stratum, the rest by size
    assert allocate([5, 3], 100) == [5, 3]  # never more than a stratum holds
    assert allocate([5, 3, 1], 2) == [1, 1, 0]  # fewer draws than strata: the largest strata
    for sizes, n in [([13, 7, 1, 30], 17), ([3, 3, 3], 4), ([100, 1], 50)]:
        parts = allocate(sizes, n)
        assert sum(parts) == n and all(0 < p <= s for p, s in zip(parts, sizes))


def test_batch_is_stratified_by_domain_and_class_proportionally():
    df = _manifest({("lvd", "cat"): 40, ("lvd", "dog"): 20, ("in1k", "cat"): 10, ("in1k", "dog"): 10})
    rows = select_normalization_batch(df, 16, seed=0)
    assert len(rows) == len(set(rows)) == 16 and rows == sorted(rows)
    assert strata_counts(df, rows) == {"in1k/cat": 2, "in1k/dog": 2, "lvd/cat": 8, "lvd/dog": 4}
    assert select_normalization_batch(df, 16, seed=0) == rows  # deterministic
    assert select_normalization_batch(df, 16, seed=1) != rows
    assert strata_counts(df, select_normalization_batch(df, 1000, seed=0)) == {
        "in1k/cat": 10, "in1k/dog": 10, "lvd/cat": 40, "lvd/dog": 20}


def test_batch_excludes_flagged_outliers_and_undecodable_files():
    df = _manifest({(None, "a"): 30, (None, "b"): 30})
    blank = [3, 40]  # all-white images: mean 1, std 0
    df.loc[blank, list(STAT_COLUMNS)] = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    broken = [5, 41]
    df.loc[broken, "decodable"] = False
    df.loc[broken, list(STAT_COLUMNS)] = np.nan
    rows = select_normalization_batch(df, 60, seed=0)
    assert not set(rows) & set(blank + broken) and len(rows) == 56
    assert strata_counts(df, rows) == {"/a": 28, "/b": 28}
    # with the outlier test switched off (huge threshold) the blank images are eligible again
    assert set(blank) <= set(select_normalization_batch(df, 60, seed=0, outlier_z=1e9))


@pytest.mark.slow
def test_normalize_draws_from_the_manifest_and_records_the_images(tmp_path, tiny_data, tiny_config, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    white = data / "circle" / "white.png"  # the 65th image: a blank one, flagged as an outlier
    Image.new("RGB", (64, 64), (255, 255, 255)).save(white)
    assert main(["data", "scan", "--data", str(data), "--out", str(tmp_path / "scan"), "--workers", "2"]) == 0
    manifest = str(tmp_path / "scan" / "manifest.parquet")
    out = tmp_path / "norm"
    argv = ["normalize", "--config", str(tiny_config), "--data", str(data), "--stage", "1", "--set",
            "normalization.num_images=64", "--manifest", manifest, "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["selection"] == "manifest-stratified" and result["metrics"]["num_images"] == 64
    assert result["metrics"]["strata"] == {"/circle": 16, "/ring": 16, "/square": 16, "/triangle": 16}
    with safe_open(str(out / "norm.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["eupe"])
    assert len(meta["images"]) == 64 and str(white) not in meta["images"] and meta["manifest"] == manifest
    assert Counter(p.split("/")[-2] for p in meta["images"]) == {"circle": 16, "ring": 16, "square": 16, "triangle": 16}

    # a manifest of another dataset is refused before any model is built
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(other / "x.png")
    capsys.readouterr()
    assert main([*argv[:-4], "--manifest", manifest, "--data", str(other), "--out", str(tmp_path / "bad")]) == 2
    assert "not in dataset" in capsys.readouterr().err and not (tmp_path / "bad").exists()
