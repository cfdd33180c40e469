"""The duplicate check names the later copy as the duplicate of the earlier one (issue: reliability, item 7)."""

import os

import numpy as np
import pandas as pd
from PIL import Image

from eupe.cli import main
from eupe.storage import read_json


def test_the_copy_made_later_is_the_duplicate_whatever_its_name(tmp_path):
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray((rng.rand(40, 40, 3) * 255).astype("uint8")).save(data / f"{i}.png")
    original = data / "z_original.png"
    Image.fromarray((rng.rand(40, 40, 3) * 255).astype("uint8")).save(original)
    copy = data / "a_copy.png"  # first in the folder's order, written later
    copy.write_bytes(original.read_bytes())
    os.utime(original, (1_600_000_000, 1_600_000_000))
    os.utime(copy, (1_700_000_000, 1_700_000_000))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("validation: {min_side: 32}\n")
    assert main(["data", "validate", "--config", str(cfg), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "v")]) != 0
    bad = read_json(str(tmp_path / "v" / "validation.json"))["bad_files"]
    dups = [(b["path"].rsplit("/", 1)[-1], b["reason"].rsplit("/", 1)[-1]) for b in bad if "duplicates" in b["checks"]]
    assert dups == [("a_copy.png", "z_original.png")], bad


def test_without_times_the_first_in_dataset_order_is_the_original():
    from eupe.data.validate import duplicate_of

    df = pd.DataFrame({"uri": ["s3://b/x.png", "s3://b/y.png", "s3://b/z.png", "s3://b/w.png"],
                       "sha256": ["h1", "h2", "h1", None]})
    got = duplicate_of(df)
    assert got.iloc[2] == "s3://b/x.png" and got.iloc[[0, 1, 3]].isna().all()
