"""Per-image statistics outliers by a robust z-score (median / MAD), on the manifest's columns.

Features of a decodable image: its channel means ``mean_r, mean_g, mean_b`` and its contrast
``log(mean(std_r, std_g, std_b) + 1/255)``. Contrast is compared in log space because its spread is
multiplicative: a blank (all-white, all-black, solid) image has zero contrast and lands more than
ten robust deviations below ordinary photos, while in linear units it would hide inside the spread.
Channel means live in [0, 1], so a mean outlier is an image far outside the colour range of the set.

``z = 0.6745 (x - median) / MAD`` (Iglewicz and Hoaglin); when more than half the values are equal
(MAD = 0) the mean absolute deviation is used instead (``z = (x - median) / (1.2533 MeanAD)``).
An image's score is its largest ``|z|`` over the features, and the feature that gave it is named.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["CONTRAST_EPS", "FEATURES", "flag_outliers", "robust_scores"]

CONTRAST_EPS = 1.0 / 255.0  # one grey level: the contrast of a solid image is log(1/255), not -inf
FEATURES = ("mean_r", "mean_g", "mean_b", "contrast")


def _features(df: pd.DataFrame) -> pd.DataFrame:
    contrast = np.log(df[["std_r", "std_g", "std_b"]].astype(float).mean(axis=1) + CONTRAST_EPS)
    return pd.DataFrame({"mean_r": df["mean_r"], "mean_g": df["mean_g"], "mean_b": df["mean_b"],
                         "contrast": contrast}, index=df.index).astype(float)


def _robust_z(x: pd.Series) -> pd.Series:
    med = x.median()
    dev = (x - med).abs()
    mad = dev.median()
    if mad > 0:
        return 0.6745 * (x - med) / mad
    mean_ad = dev.mean()
    return (x - med) / (1.253314 * mean_ad) if mean_ad > 0 else x * 0.0


def robust_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Columns ``outlier_z`` (max |z| over :data:`FEATURES`) and ``outlier_feature`` for every
    decodable row (NaN / None for the others), same index as ``df``."""
    out = pd.DataFrame({"outlier_z": np.nan, "outlier_feature": None}, index=df.index)
    ok = df["decodable"].fillna(False).astype(bool)
    if not ok.any():
        return out
    z = _features(df[ok]).apply(_robust_z).abs()
    out.loc[ok, "outlier_z"] = z.max(axis=1)
    out.loc[ok, "outlier_feature"] = z.idxmax(axis=1)
    return out


def flag_outliers(df: pd.DataFrame, threshold: float) -> pd.Series:
    """True for each decodable row whose robust score exceeds ``threshold``."""
    return robust_scores(df)["outlier_z"].fillna(0.0) > threshold
