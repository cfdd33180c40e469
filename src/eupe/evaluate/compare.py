"""``eupe evaluate --compare``: every encoder of the recipe side by side on the same held-out images.

Rows: each teacher (the zoo's weights with ``--teachers``), the proxy (``--proxy``), the student (``--weights``)
and a randomly initialised student of the same architecture (seeded: the same network every run), each
measured by :func:`eupe.evaluate.run._evaluate` exactly as the evaluate step measures the student (k-NN on the
summary vector, linear seg and ridge depth probes on patch tokens, keypoint PCK), each at its own ``img_size``
(or ``eval.resolution``). A ``chance`` row says what knowing nothing scores: k-NN answering the most common
class, segmentation labelling every pixel with the most common class, depth predicting the mean depth.
``compare.json`` holds the rows; ``result.json`` the same, flat (``<row>.<metric>``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from eupe import storage
from eupe.config import Config
from eupe.errors import EupeError
from eupe.fingerprint import data_inputs, fingerprint
from eupe.step import StepRun

log = logging.getLogger(__name__)

COMPARE_FILE = "compare.json"
COLUMNS = ("knn_top1", "seg_miou", "depth_rmse", "keypoint_pck")
RANDOM_STUDENT = "random student"


def _rows(cfg: Config, student_weights: str | None) -> list[tuple[str, str, str | None, bool]]:
    """(row label, encoder name, weights, random) in table order."""
    rows = [(t.name, t.name, None, False) for t in cfg.teachers]
    rows += [("proxy", "proxy", None, False), ("student", "student", student_weights, False),
             (RANDOM_STUDENT, "student", None, True)]
    return rows


def _chance(held, ignore_index: int) -> dict:
    from eupe.evaluate.probes import miou

    out: dict = {"knn_top1": float(held.labels.bincount().max()) / len(held.labels) if bool((held.labels >= 0).all())
                 else None, "keypoint_pck": None}
    if held.masks is not None:
        m = held.masks.long()
        keep = m[m != ignore_index]
        majority = int(keep.bincount().argmax()) if keep.numel() else 0
        num_classes = int(keep.max()) + 1 if keep.numel() else 1
        out["seg_miou"] = miou(torch.full_like(m, majority), m, num_classes, ignore_index)[0]
    if held.depths is not None:
        d = held.depths[held.depths > 0].double()
        out["depth_rmse"] = float(((d - d.mean()) ** 2).mean().sqrt()) if d.numel() else None
    return out


def run_compare(cfg: Config, out: str | Path, student_weights: str | None) -> dict:
    from eupe.distill.runtime import setup, teardown
    from eupe.evaluate.run import _evaluate, check_inputs, eval_data
    from eupe.models.registry import check_fits, check_weights

    rows = _rows(cfg, student_weights)
    if not student_weights and not cfg.student.weights:
        raise EupeError("--compare: pass the trained student's --weights (the comparison is with a random student)")
    if not cfg.proxy.weights:
        raise EupeError("--compare: pass the trained proxy's --proxy (or set proxy.weights)")
    inputs, data = {}, eval_data(cfg)  # the images and their labels, read once for every row
    for label, name, weights, random in rows:
        i = check_inputs(cfg, name, weights, None, None, None, data)
        if random:
            i.spec = i.spec.model_copy(update={"weights": None})
        inputs[label] = i
    check_weights(cfg.proxy.weights, "proxy.weights")
    fp = fingerprint("evaluate-compare", {**data_inputs(cfg.data), **{
        f"{label}.weights": i.spec.weights for label, i in inputs.items()}}, cfg)

    def check() -> None:  # weights that do not fit their row's model fail before --out is touched
        for i in inputs.values():
            check_fits(i.spec, i.field)

    run = StepRun(out, "evaluate-compare", fp, check=check)
    if run.done:
        return run.done
    rt = setup(cfg)
    table, chance, timings = {}, None, {}
    try:
        for label, i in inputs.items():
            t0 = time.perf_counter()
            size = cfg.eval.resolution or i.spec.img_size
            evaluation, examples = _evaluate(cfg, i, rt, size, label=label)
            table[label] = {**{k: evaluation.get(k) for k in COLUMNS}, "depth_delta1": evaluation.get("depth_delta1"),
                            "model": i.spec.model, "weights": i.spec.weights, "resolution": size,
                            "random_init": i.spec.weights is None}
            if chance is None:
                chance = _chance(examples["held"], cfg.eval.ignore_index)
            timings[label] = time.perf_counter() - t0
    finally:
        teardown()
    objectives = {t.name: t.train.objective for t in cfg.teachers if t.train is not None}
    report = {"rows": table, "chance": chance, "teacher_objectives": objectives, "timings_s": timings,
              "num_heldout": len(inputs["student"].split.heldout), "num_train": len(inputs["student"].split.train)}
    with run.staging() as tmp:
        storage.write_json(str(tmp / COMPARE_FILE), report)
    metrics: dict = {"rows": table, "chance": chance, "teacher_objectives": objectives}
    for label, row in table.items():
        for k in COLUMNS:
            if row.get(k) is not None:
                metrics[f"{label.replace(' ', '_')}.{k}"] = row[k]
    log.info("compare: %s", {label: {k: row[k] for k in COLUMNS} for label, row in table.items()})
    return run.finish(metrics, {"compare": run.path(COMPARE_FILE)})
