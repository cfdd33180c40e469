"""``eupe evaluate``, top to bottom:

    check every input (encoder, weights, checkpoint + norm, baseline, data and its labels)
    -> encode the train and held-out splits once (batched, inference mode)
    -> k-NN on class tokens, linear seg and depth probes on patch tokens
    -> PCK@0.1 between held-out images and a known homography of each
    -> fidelity of the adapted features to each target (when a training checkpoint is given)
    -> eval.json, PNGs and result.json, published together; then the quality gate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from eupe.progress import progress

from eupe import storage
from eupe.config import Config, ModelSpec
from eupe.data.folder import ImageSource
from eupe.distill.normalize import check_bound, load_stats
from eupe.distill.runtime import Runtime, pick_device, setup, teardown
from eupe.distill.targets import build_targets, model_inputs, prepare_for, target_specs
from eupe.errors import EupeError, GateFailed
from eupe.evaluate import gate, knn, probes, report
from eupe.evaluate.data import EvalImages, Split, available_labels, open_image_folder, recipe_split
from eupe.evaluate.fidelity import adapter_states, build_adapters, fidelity_batch
from eupe.evaluate.keypoints import cell_centres, match, sample_mask
from eupe.evaluate.warp import random_homographies, warp_images
from eupe.models.features import Features, extract_features, feature_dims
from eupe.models.registry import build_model, check_model_name, check_weights, freeze
from eupe.fingerprint import data_inputs, fingerprint
from eupe.step import StepRun

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
METRICS = ("knn_top1", "seg_miou", "depth_rmse", "depth_delta1", "keypoint_pck", "fidelity")


@dataclass
class Encoded:
    cls: torch.Tensor  # [N, C] float32
    patches: torch.Tensor  # [N, T, D] float16 (memory: the probes upcast per batch)
    grid: tuple[int, int]
    labels: torch.Tensor  # [N] class index, -1 unknown
    masks: torch.Tensor | None  # [N, L, L] int32
    depths: torch.Tensor | None  # [N, L, L] float32 metres, 0 = none
    images: torch.Tensor | None  # [N, 3, S, S] uint8 (held-out split only)
    skipped: int  # undecodable files replaced by the next image that decodes


@dataclass
class Inputs:
    """Everything the run reads, checked before the first forward pass."""

    name: str
    field: str
    spec: ModelSpec
    source: ImageSource
    split: Split
    labels: dict[str, bool]
    checkpoint: str | None
    norm: str | None
    stage: int | None
    adapters: dict[str, dict[str, torch.Tensor]] | None  # target -> its adapter's state, from --checkpoint
    baseline: dict[str, float] | None
    norm_stats: tuple[dict, dict] | None = None  # --norm as read (load_stats: statistics, metadata)


def encoder_spec(cfg: Config, name: str) -> tuple[str, ModelSpec]:
    """``student``, ``proxy`` or a teacher's name -> (config field, spec)."""
    if name in ("student", "proxy"):
        return name, getattr(cfg, name)
    for i, t in enumerate(cfg.teachers):
        if t.name == name:
            return f"teachers.{i}", t
    raise EupeError(f"--encoder {name!r}: expected student, proxy or a teacher ({', '.join(t.name for t in cfg.teachers)})")


def eval_data(cfg: Config) -> tuple[ImageSource, Split, dict[str, bool]]:
    """The recipe's images (an indexable folder), its split and the dense labels they carry, checked."""
    source = open_image_folder(cfg.data.root, "evaluation")
    sp = recipe_split(len(source), cfg)
    return source, sp, available_labels(source, sp.train + sp.heldout)


def check_inputs(cfg: Config, name: str, weights: str | None, checkpoint: str | None, norm: str | None,
                 baseline: str | None, data: tuple[ImageSource, Split, dict[str, bool]] | None = None) -> Inputs:
    """``data``: :func:`eval_data`, when the caller (a comparison of several encoders) has read it already."""
    field, spec = encoder_spec(cfg, name)
    if (checkpoint is None) != (norm is None):
        raise EupeError("fidelity needs both --checkpoint (the training checkpoint with adapters) and --norm")
    if weights or checkpoint:  # a training checkpoint carries the encoder too (``encoder.*`` keys)
        spec = spec.model_copy(update={"weights": weights or checkpoint})
    check_model_name(spec.model, f"{field}.model")
    check_weights(spec.weights, "--weights" if weights else "--checkpoint" if checkpoint else f"{field}.weights")
    stage = adapters = norm_stats = None
    if checkpoint is not None:
        if name not in ("student", "proxy"):
            raise EupeError(f"--checkpoint: fidelity is measured for the trained student or proxy, not teacher {name!r}")
        check_weights(norm, "--norm")
        stats, meta = norm_stats = load_stats(norm)
        stage = int(meta.get("stage") or (1 if name == "proxy" else 3))
        if (stage == 1) != (name == "proxy"):
            raise EupeError(f"--norm {norm} holds stage-{stage} statistics, which do not belong to the {name}")
        for tname, where, tspec, _ in target_specs(cfg, stage):
            if tname not in stats:
                raise EupeError(f"--norm {norm}: no statistics for target {tname!r} (has {sorted(stats)})")
            check_weights(tspec.weights, f"{where}.weights")
        adapters = adapter_states(checkpoint, [tname for tname, *_ in target_specs(cfg, stage)])
    base = gate.read_baseline(baseline) if baseline else None
    source, sp, labels = data or eval_data(cfg)
    return Inputs(name, field, spec, source, sp, labels, checkpoint, norm, stage, adapters, base, norm_stats)


@torch.inference_mode()
def encode(model: torch.nn.Module, loader: DataLoader, rt: Runtime, size: int, keep_images: bool, desc: str) -> Encoded:
    mean, std = model_inputs(model, rt.device)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("cls", "patches", "label", "mask", "depth", "image")}
    grid, skipped = None, 0
    for batch in progress(loader, desc=desc, unit="batch"):
        with rt.autocast():
            f = extract_features(model, prepare_for(model, batch["image"], size, mean, std))
        grid, skipped = f.grid, skipped + int(batch["skipped"].sum())
        parts["cls"].append(f.cls.float().cpu())
        parts["patches"].append(f.patches.half().cpu())
        parts["label"].append(torch.as_tensor(batch["label"]))
        for key, dtype in (("mask", torch.int32), ("depth", torch.float32)):
            if key in batch:
                parts[key].append(batch[key].to(dtype))
        if keep_images:
            parts["image"].append(batch["image"])
    cat = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return Encoded(cat["cls"], cat["patches"], grid, cat["label"], cat["mask"], cat["depth"], cat["image"], skipped)


def _loader(cfg: Config, inputs: Inputs, indices: list[int], size: int) -> DataLoader:
    dataset = EvalImages(inputs.source, indices, size, cfg.eval.label_size, inputs.labels)
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers)


def _knn(cfg: Config, train: Encoded, held: Encoded, notes: dict) -> float | None:
    if (train.labels < 0).any() or (held.labels < 0).any() or len(train.labels.unique()) < 2:
        notes["knn_top1"] = "images are not in class folders (need at least 2 classes)"
        return None
    return knn.knn_top1(train.cls, train.labels, held.cls, held.labels, cfg.eval.knn_k, cfg.eval.knn_temperature)


def _segmentation(cfg: Config, train: Encoded, held: Encoded, rt: Runtime, details: dict,
                  notes: dict) -> tuple[float | None, Any]:
    e = cfg.eval
    for part, enc in (("training", train), ("held-out", held)):
        if bool((enc.masks == e.ignore_index).all()):
            notes["seg_miou"] = f"every {part} mask pixel is eval.ignore_index ({e.ignore_index}): nothing to score"
            return None, None
    both = torch.cat([train.masks.flatten(), held.masks.flatten()])
    num_classes = int(both[both != e.ignore_index].max()) + 1
    probe, losses = probes.train_seg_probe(
        train.patches, train.grid, train.masks.long(), num_classes, ignore_index=e.ignore_index, epochs=e.probe_epochs,
        lr=e.probe_lr, weight_decay=e.probe_weight_decay, batch_size=e.probe_batch_size, seed=cfg.seed, device=rt.device)
    pred = probes.predict(probe, held.patches, held.grid, held.masks.shape[-1], e.probe_batch_size, rt.device, classes=True)
    score, per_class = probes.miou(pred, held.masks.long(), num_classes, e.ignore_index)
    details.update(seg_num_classes=num_classes, seg_iou_per_class=per_class, seg_probe_loss=losses)
    return score, pred


def _depth(cfg: Config, train: Encoded, held: Encoded, rt: Runtime) -> tuple[probes.DepthScores, torch.Tensor]:
    probe = probes.fit_depth_probe(train.patches, train.grid, train.depths, cfg.eval.depth_ridge)
    pred = probes.predict(probe.to(rt.device), held.patches, held.grid, held.depths.shape[-1], cfg.eval.probe_batch_size,
                          rt.device)[:, 0]
    return probes.depth_metrics(pred, held.depths), pred


@torch.inference_mode()
def _keypoints(cfg: Config, model: torch.nn.Module, held: Encoded, rt: Runtime, size: int) -> tuple[float | None, dict, dict]:
    mean, std = model_inputs(model, rt.device)
    g = torch.Generator().manual_seed(cfg.seed)
    correct = total = 0
    fine = min(cfg.eval.label_size, size)  # warped features upsampled to this grid: sub-cell match positions
    example: dict = {}
    for start in range(0, held.images.shape[0], cfg.eval.batch_size):
        images = held.images[start : start + cfg.eval.batch_size]
        h = random_homographies(images.shape[0], size, cfg.eval.warp_strength, g)
        warped = warp_images(images, h)
        with rt.autocast():
            dst = extract_features(model, prepare_for(model, warped, size, mean, std))
        src_valid = None
        if held.masks is not None:
            values = sample_mask(held.masks[start : start + images.shape[0]], cell_centres(held.grid, (size, size)), (size, size))
            src_valid = (values != 0) & (values != cfg.eval.ignore_index)
        m = match(held.patches[start : start + images.shape[0]].to(rt.device), held.grid, dst.patches, dst.grid, h,
                  (size, size), cfg.eval.pck_alpha, src_valid, fine=(fine, fine))
        correct, total = correct + int(m.correct.sum()), total + int(m.valid.sum())
        if not example:
            example = {"image": images[0], "warped": warped[0], "source": m.source, "predicted": m.predicted[0],
                       "valid": m.valid[0], "correct": m.correct[0]}
    return (correct / total if total else None), {"correct": correct, "total": total}, example


@dataclass
class FidelityInputs:
    """What fidelity reads besides the encoder: the targets as built now, their statistics, the trained adapters."""

    targets: list
    stats: dict
    adapters: dict


def fidelity_inputs(cfg: Config, inputs: Inputs, model: torch.nn.Module, size: int) -> FidelityInputs:
    """Built and checked against each other (statistics of these very targets, adapters that fit the encoder)
    before any compute: a --checkpoint/--norm that do not belong together fail here."""
    stats, meta = inputs.norm_stats  # read by check_inputs
    targets = build_targets(cfg, inputs.stage, pick_device(cfg))
    check_bound(targets, stats, meta, inputs.norm)  # the statistics describe these very targets
    adapters = build_adapters(inputs.checkpoint, inputs.adapters, stats, feature_dims(model, size))
    return FidelityInputs(targets, stats, adapters)


def _fidelity(cfg: Config, fid: FidelityInputs, held: Encoded, rt: Runtime, size: int) -> tuple[dict, dict]:
    targets, stats, adapters = fid.targets, fid.stats, fid.adapters
    names = [t.name for t in targets]
    sums = {n: torch.zeros(2) for n in names}
    bs = cfg.eval.batch_size
    for start in progress(range(0, held.images.shape[0], bs), desc="fidelity", unit="batch"):
        sl = slice(start, start + bs)
        feats = Features(held.cls[sl].to(rt.device), held.patches[sl].to(rt.device), held.grid)
        with rt.autocast():
            for name, v in fidelity_batch(feats, held.images[sl], targets, adapters, stats, size).items():
                sums[name] += v
    n = held.images.shape[0]
    detail = {name: {"cls": float(s[0] / n), "patch": float(s[1] / n)} for name, s in sums.items()}
    return {name: (d["cls"] + d["patch"]) / 2 for name, d in detail.items()}, detail


def run_evaluate(cfg: Config, encoder: str, out: str | Path, weights: str | None = None, checkpoint: str | None = None,
                 norm: str | None = None, baseline: str | None = None) -> dict:
    inputs = check_inputs(cfg, encoder, weights, checkpoint, norm, baseline)
    size = cfg.eval.resolution or inputs.spec.img_size

    def check() -> tuple:  # weights that do not load into the encoder, a --checkpoint/--norm that do not fit it:
        # before --out is touched
        model = _build(cfg, inputs)
        return model, fidelity_inputs(cfg, inputs, model, size) if inputs.checkpoint else None

    run = StepRun(out, "evaluate", fingerprint("evaluate", {
        **data_inputs(cfg.data), f"{inputs.field}.weights": inputs.spec.weights, "checkpoint": checkpoint, "norm": norm,
        "proxy.weights": cfg.proxy.weights if checkpoint else None, "baseline": baseline}, cfg, encoder=encoder),
        check=check)
    if run.done:
        return run.done
    rt = setup(cfg)
    try:
        evaluation, examples = _evaluate(cfg, inputs, rt, size, *run.checked)
    finally:
        teardown()
    outcome = None
    if inputs.baseline is not None:
        outcome = gate.check(evaluation, inputs.baseline, cfg.eval.tolerances, cfg.eval.allow_missing_metrics)
    if outcome is not None:
        evaluation["gate"] = {"baseline": baseline, **outcome}
    result = _publish(run, evaluation, examples, inputs, outcome)
    if outcome is not None and not outcome["passed"]:
        raise GateFailed(gate.failure_message(outcome, baseline))
    return result


def _build(cfg: Config, inputs: Inputs) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # a randomly initialised encoder (tests, the demo) is the same network every run
    return build_model(inputs.spec, inputs.field)


def _evaluate(cfg: Config, inputs: Inputs, rt: Runtime, size: int, model: torch.nn.Module | None = None,
              fid: FidelityInputs | None = None, label: str | None = None) -> tuple[dict, dict]:
    """``model``: the encoder :func:`_build` made (when it was built to check its weights), else built here;
    ``fid``: :func:`fidelity_inputs`, given with --checkpoint/--norm (fidelity is measured); ``label``: the row of a
    comparison, named in the progress lines."""
    timings, details, notes, examples = {}, {}, {}, {}
    t0 = time.perf_counter()
    model = freeze(model if model is not None else _build(cfg, inputs)).to(rt.device)
    desc = f"{label}: encode" if label else "encode"
    train = encode(model, _loader(cfg, inputs, inputs.split.train, size), rt, size, False, f"{desc} train")
    held = encode(model, _loader(cfg, inputs, inputs.split.heldout, size), rt, size, True, f"{desc} held-out")
    timings["encode"] = time.perf_counter() - t0
    metrics: dict[str, Any] = dict.fromkeys(METRICS)

    t = time.perf_counter()
    metrics["knn_top1"] = _knn(cfg, train, held, notes)
    if metrics["knn_top1"] is not None:  # what always answering the most common class scores: chance level
        metrics["knn_chance"] = float(held.labels.bincount().max()) / len(held.labels)
    timings["knn"] = time.perf_counter() - t
    if inputs.labels["mask"]:
        t = time.perf_counter()
        metrics["seg_miou"], seg = _segmentation(cfg, train, held, rt, details, notes)
        if seg is not None:
            examples["seg"] = seg
        timings["seg_probe"] = time.perf_counter() - t
    else:
        notes["seg_miou"] = "no .mask.png labels"
    if inputs.labels["depth"]:
        t = time.perf_counter()
        scores, examples["depth"] = _depth(cfg, train, held, rt)
        metrics["depth_rmse"], metrics["depth_delta1"] = scores.rmse, scores.delta1
        timings["depth_probe"] = time.perf_counter() - t
    else:
        notes["depth_rmse"] = notes["depth_delta1"] = "no .depth.png labels"
    t = time.perf_counter()
    metrics["keypoint_pck"], details["keypoints"], examples["keypoints"] = _keypoints(cfg, model, held, rt, size)
    timings["keypoints"] = time.perf_counter() - t
    if metrics["keypoint_pck"] is None:
        notes["keypoint_pck"] = "no keypoint lands inside a warped image"
    if fid is not None:
        t = time.perf_counter()
        metrics["fidelity"], details["fidelity"] = _fidelity(cfg, fid, held, rt, size)
        timings["fidelity"] = time.perf_counter() - t
    else:
        notes["fidelity"] = "no --checkpoint/--norm given"
    timings["total"] = time.perf_counter() - t0
    examples.update(held=held)
    log.info("evaluate %s: %s", inputs.name, {k: v for k, v in metrics.items() if v is not None})
    setup_info = {
        "encoder": inputs.name, "model": inputs.spec.model, "weights": inputs.spec.weights, "checkpoint": inputs.checkpoint,
        "norm": inputs.norm, "stage": inputs.stage, "data": str(cfg.data.root), "resolution": size,
        "label_size": held.masks.shape[-1] if held.masks is not None else min(cfg.eval.label_size, size),
        "grid": list(held.grid), "num_train": len(inputs.split.train), "num_heldout": len(inputs.split.heldout),
        "undecodable_skipped": train.skipped + held.skipped,
        "labels": inputs.labels, "seed": cfg.seed, "device": str(rt.device), "eval": cfg.eval.model_dump(mode="json"),
    }
    return {**metrics, "details": details, "skipped": notes, "setup": setup_info, "timings_s": timings}, examples


def _publish(run: StepRun, evaluation: dict, examples: dict, inputs: Inputs, outcome: dict | None) -> dict:
    """eval.json and its PNGs, published together; then result.json."""
    held: Encoded = examples["held"]
    scores = gate.gated_values(evaluation)
    plots = {"metrics_plot": run.path("eval_metrics.png")}
    with run.staging() as tmp:
        report.metrics_chart(scores, tmp / "eval_metrics.png", inputs.baseline, title=f"{inputs.name}: {inputs.spec.model}")
        if "seg" in examples:
            num_classes = evaluation["details"]["seg_num_classes"]
            report.seg_example(held.images[0], held.masks[0], examples["seg"][0], num_classes, tmp / "seg_example.png")
            plots["seg_plot"] = run.path("seg_example.png")
        if "depth" in examples:
            report.depth_example(held.images[0], held.depths[0], examples["depth"][0], tmp / "depth_example.png")
            plots["depth_plot"] = run.path("depth_example.png")
        if examples.get("keypoints"):
            report.keypoint_example(**examples["keypoints"], path=tmp / "keypoints_example.png")
            plots["keypoints_plot"] = run.path("keypoints_example.png")
        evaluation["plots"] = {k: str(v) for k, v in plots.items()}
        storage.write_json(str(tmp / EVAL_FILE), evaluation)
        metrics = {k: evaluation[k] for k in METRICS}
        if evaluation.get("knn_chance") is not None:
            metrics["knn_chance"] = evaluation["knn_chance"]  # the table shows it next to knn_top1
        if outcome is not None:
            metrics["gate_passed"] = outcome["passed"]
            metrics["gate_regressed"] = outcome["regressed"]
        status = "failed" if outcome is not None and not outcome["passed"] else "ok"
    return run.finish(metrics, {"eval": run.path(EVAL_FILE), **plots}, status=status)
