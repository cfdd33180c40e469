"""Per-target feature statistics: computed once on a batch at the start of a stage, then frozen.

Saved as one safetensors file (``<target>.cls_mean`` ... ``<target>.patch_std``) with the images used
recorded in its metadata, so every training stage and every rank normalizes identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.utils.data import DataLoader, Subset
from eupe.progress import progress

from eupe import storage
from eupe.config import Config
from eupe.data.sources import ImageStream, open_data
from eupe.data.loader import DistillImages
from eupe.distill.targets import Target, build_targets, check_models, check_proxy, target_features, target_specs
from eupe.errors import EupeError
from eupe.distill.runtime import pick_device
from eupe.fingerprint import data_inputs, fingerprint
from eupe.models.features import feature_dims
from eupe.step import StepRun

_FIELDS = ("cls_mean", "cls_std", "patch_mean", "patch_std")
STATS_FILE = "norm.safetensors"


@dataclass(frozen=True)
class FeatureStats:
    cls_mean: torch.Tensor
    cls_std: torch.Tensor
    patch_mean: torch.Tensor
    patch_std: torch.Tensor

    @property
    def dims(self) -> tuple[int, int]:
        return self.cls_mean.numel(), self.patch_mean.numel()

    def apply(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = cls.device
        return (
            (cls.float() - self.cls_mean.to(dev)) / self.cls_std.to(dev),
            (patches.float() - self.patch_mean.to(dev)) / self.patch_std.to(dev),
        )


class StatsAccumulator:
    """Per-channel mean/std in float64 over every class vector and every patch token seen."""

    def __init__(self) -> None:
        self._sums: dict[str, list[torch.Tensor | int]] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        s = self._sums.setdefault(key, [torch.zeros(x.shape[-1], dtype=torch.float64)] * 2 + [0])
        s[0] = s[0] + x.sum(0)
        s[1] = s[1] + (x * x).sum(0)
        s[2] = s[2] + x.shape[0]

    def stats(self, eps: float) -> FeatureStats:
        out = {}
        for key in ("cls", "patch"):
            total, sq, n = self._sums[key]
            mean = total / n
            var = (sq / n - mean * mean).clamp_min(0)
            out[f"{key}_mean"], out[f"{key}_std"] = mean.float(), (var.sqrt() + eps).float()
        return FeatureStats(**out)


def save_stats(uri: str, stats: dict[str, FeatureStats], meta: dict) -> None:
    tensors = {f"{name}.{f}": getattr(s, f).contiguous() for name, s in stats.items() for f in _FIELDS}
    storage.write_bytes(uri, save(tensors, metadata={"eupe": json.dumps(meta)}))


def load_stats(uri: str) -> tuple[dict[str, FeatureStats], dict]:
    path = storage.local_copy(uri)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("eupe", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EupeError(f"cannot read normalization stats {uri}: {e}") from None
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    try:
        stats = {n: FeatureStats(**{f: tensors[f"{n}.{f}"] for f in _FIELDS}) for n in names}
    except KeyError as e:
        raise EupeError(f"normalization stats {uri}: missing tensor {e}") from None
    return stats, meta


def check_bound(targets: list[Target], stats: dict[str, FeatureStats], meta: dict, norm: str) -> None:
    """The statistics describe these very targets, before any compute: the same feature widths, the same weights
    (content digest), summary choice, resolutions and input sizes as recorded by ``eupe normalize``."""
    recorded = meta.get("targets")
    if not isinstance(recorded, dict):
        raise EupeError(f"--norm {norm} does not record which target weights it describes (an older file): "
                        "compute it again with eupe normalize")
    for t in targets:
        dims = feature_dims(t.model, min(t.resolutions))
        if tuple(dims) != tuple(stats[t.name].dims):
            raise EupeError(f"--norm {norm}: {t.name} has feature dims {stats[t.name].dims}, the model gives {dims}")
        want, have = recorded.get(t.name) or {}, t.record
        if want.get("weights") != have["weights"]:
            raise EupeError(f"--norm {norm}: the statistics of {t.name} were computed with weights {want.get('weights')}, "
                            f"this run's {t.name} has weights {have['weights']}: compute them again for these weights")
        for key in ("summary", "resolutions", "input_sizes"):
            if want.get(key) != have[key]:
                raise EupeError(f"--norm {norm}: the statistics of {t.name} were computed with {key} {want.get(key)}, "
                                f"this run uses {have[key]}: compute them again")


def _manifest_batch(cfg: Config, source, manifest: str) -> tuple[list[int], dict[str, int]]:
    """Source indices of the stratified, outlier-free batch drawn from ``manifest`` (eupe data scan)."""
    from eupe.data.manifest import read_manifest
    from eupe.data.norm_batch import select_normalization_batch, strata_counts

    df = read_manifest(manifest)
    rows = select_normalization_batch(df, cfg.normalization.num_images, cfg.seed, cfg.validation.outlier_z)
    if not rows:
        raise EupeError(f"manifest {manifest}: no decodable, non-outlier images to normalize with")

    def key(uri: str) -> str:
        return uri if storage.is_s3(uri) else str(Path(uri).resolve())

    index = {key(source.uri(i)): i for i in range(len(source))}
    uris = df["uri"].iloc[rows].tolist()
    missing = [u for u in uris if key(u) not in index]
    if missing:
        raise EupeError(f"manifest {manifest}: {len(missing)} selected images are not in dataset {cfg.data.root} "
                        f"(first: {missing[0]}); scan this dataset again")
    return [index[key(u)] for u in uris], strata_counts(df, rows)


def run_normalize(cfg: Config, stage: int, out: str | Path, manifest: str | None = None,
                  random_proxy: bool = False) -> dict:
    """``eupe normalize``: statistics of every target of ``stage`` at each of its resolutions.

    The batch is ``normalization.num_images`` images: with a ``manifest`` (``eupe data scan``) a sample
    stratified by domain and class without undecodable files and outliers, otherwise a seeded
    uniform sample of the dataset. The images used are listed in the stats' metadata, and, per target, what
    the statistics describe (:attr:`Target.record`: weights digest, summary choice, resolutions, input sizes)."""
    check_models(cfg, stage)
    check_proxy(cfg, stage, random_proxy)
    source = open_data(cfg.data, cfg.seed, cfg.validation.max_pixels)  # the pixel limit validation applies
    if isinstance(source, ImageStream):
        raise EupeError(f"normalize: {cfg.data.root} streams (.tar shards); normalize needs random access: "
                        "point --data at an image folder of the same data (local or s3://)")
    weights = {f"{field}.weights": spec.weights for _, field, spec, _ in target_specs(cfg, stage)}

    def check() -> tuple:  # a --manifest that does not fit the data and target weights that do not load fail
        # before --out is touched: (the manifest's indices and strata, or None, None; the targets)
        picked = _manifest_batch(cfg, source, manifest) if manifest is not None else (None, None)
        return *picked, build_targets(cfg, stage, pick_device(cfg))

    run = StepRun(out, f"normalize-stage{stage}",
                  fingerprint(f"normalize-stage{stage}", {**data_inputs(cfg.data), **weights, "manifest": manifest}, cfg),
                  check=check)
    if run.done:
        return run.done
    indices, strata, targets = run.checked
    if manifest is None:
        g = torch.Generator().manual_seed(cfg.seed)
        indices = sorted(torch.randperm(len(source), generator=g)[:cfg.normalization.num_images].tolist())
    n = len(indices)
    size = max(r for t in targets for r in t.resolutions)
    loader = DataLoader(Subset(DistillImages(source, size, train=False), indices),
                        batch_size=cfg.normalization.batch_size, num_workers=cfg.data.num_workers)
    accs = {t.name: StatsAccumulator() for t in targets}
    for images, *_ in progress(loader, desc=f"normalize stage{stage}", unit="batch"):
        for t in targets:
            for r in t.resolutions:
                f = target_features(t, images, r)
                accs[t.name].add("cls", f.cls)
                accs[t.name].add("patch", f.patches)
    stats = {name: acc.stats(cfg.normalization.eps) for name, acc in accs.items()}
    selection = {"selection": "manifest-stratified" if manifest else "random", "manifest": manifest, "strata": strata}
    meta = {"stage": stage, "num_images": n, "images": [source.uri(i) for i in indices],
            "resolutions": {t.name: t.resolutions for t in targets}, "targets": {t.name: t.record for t in targets},
            **selection}
    with run.staging() as tmp:
        save_stats(str(tmp / STATS_FILE), stats, meta)
    dims = {name: {"cls": s.dims[0], "patch": s.dims[1]} for name, s in stats.items()}
    return run.finish({"num_images": n, "dims": dims, **selection}, {"stats": run.path(STATS_FILE)})
