"""The image batch behind the frozen teacher normalization, drawn from the scan manifest.

Stratified by (domain, class), proportionally to each stratum's size (largest-remainder rounding,
at least one image per stratum when the batch has room for all), with undecodable files and the
flagged statistics outliers (:mod:`eupe.data.outliers`) left out, so that a few blank or broken
images cannot skew the statistics every stage is normalized with.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from eupe.config import ValidationConfig
from eupe.data.outliers import flag_outliers

__all__ = ["allocate", "select_normalization_batch", "strata_counts"]

DEFAULT_OUTLIER_Z = ValidationConfig().outlier_z


def allocate(sizes: list[int], n: int) -> list[int]:
    """Split ``n`` draws over strata of ``sizes`` proportionally (largest remainder), never more than a
    stratum holds, at least one per stratum when ``n >= len(sizes)``; the parts sum to ``min(n, sum)``."""
    total = sum(sizes)
    n = min(n, total)
    if n == total:
        return list(sizes)
    quota = [n * s / total for s in sizes]
    alloc = [min(s, math.floor(q)) for s, q in zip(sizes, quota)]
    if n >= len(sizes):
        alloc = [max(1, a) for a in alloc]
    floor = 1 if n >= len(sizes) else 0
    while sum(alloc) < n:  # give to the stratum furthest below its quota that has images left
        i = max((i for i, s in enumerate(sizes) if alloc[i] < s), key=lambda i: (quota[i] - alloc[i], -i))
        alloc[i] += 1
    while sum(alloc) > n:  # the one-per-stratum floor overshot: take from the furthest above quota
        i = min((i for i in range(len(sizes)) if alloc[i] > floor), key=lambda i: (quota[i] - alloc[i], i))
        alloc[i] -= 1
    return alloc


def _strata(df: pd.DataFrame) -> pd.Series:
    domain = df["domain"].astype(object).where(df["domain"].notna(), "")
    label = df["label"].astype(object).where(df["label"].notna(), "")
    return domain.astype(str) + "/" + label.astype(str)


def select_normalization_batch(manifest_df: pd.DataFrame, n: int, seed: int,
                               outlier_z: float = DEFAULT_OUTLIER_Z) -> list[int]:
    """Row positions (sorted) of ``manifest_df`` for a normalization batch of up to ``n`` images:
    stratified by (domain, class), excluding undecodable rows and outliers above ``outlier_z``."""
    df = manifest_df.reset_index(drop=True)
    usable = df["decodable"].fillna(False).astype(bool) & ~flag_outliers(df, outlier_z)
    strata = _strata(df)[usable]
    groups = sorted(strata.groupby(strata).groups.items())  # deterministic order: by stratum key
    counts = allocate([len(rows) for _, rows in groups], n)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for (_, rows), k in zip(groups, counts):
        chosen.extend(int(i) for i in rng.choice(np.asarray(rows), size=k, replace=False))
    return sorted(chosen)


def strata_counts(manifest_df: pd.DataFrame, rows: list[int]) -> dict[str, int]:
    """``{"domain/class": images}`` of the selected ``rows`` (empty domain or class: unknown)."""
    picked = _strata(manifest_df.reset_index(drop=True)).iloc[rows]
    return {str(k): int(v) for k, v in sorted(picked.value_counts().items())}
