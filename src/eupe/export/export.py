"""``eupe export``: the trained encoder (adapters dropped) -> one ExecuTorch ``.pte`` per configured
input size, fp32 and optionally int8, each checked against eager PyTorch on real images; with several
sizes (and ``export.multi_resolution``) also one ``.pte`` per dtype whose program has a method per size
(``forward_256``, ...), the weights the methods share stored once.

Writes ``export.json`` (per variant: ``pte``, ``input_shape``, ``dtype``, ``parity_cosine``,
``parity_max_abs``, ``bytes``, ``export_s``, delegation; the multi-resolution rows add ``methods``, each
with its own parity, and ``single_resolution_bytes``, the sum of the one-size files it stands for),
``export.png`` and ``result.json``. Each size's graph is exported (and quantized) once, and the one-size and the
multi-resolution lowering share it, so a multi-resolution row's ``export_s`` is its lowering alone. ``--only
multires`` writes the multi-resolution files only (the pipeline's extra export element, beside one element per
size x dtype), lowering the one-size programs just to record ``single_resolution_bytes``. A parity miss, or an operator left outside XNNPACK under
``export.require_full_delegation``, fails after ``export.json`` is written, so the failing numbers are on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from eupe import storage
from eupe.config import Config
from eupe.data.folder import ImageSource
from eupe.distill.targets import model_inputs, prepare
from eupe.errors import EupeError, GateFailed
from eupe.evaluate.data import EvalImages, open_image_folder
from eupe.export.lower import EncoderOutputs, Lowered, check_size, fixed_size, lower_methods, to_program
from eupe.export.runtime import Forward, load_program, parity
from eupe.models.registry import build_model, check_weights
from eupe.fingerprint import data_inputs, fingerprint
from eupe.step import StepRun

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
ENCODERS = ("student", "proxy")
CALIBRATION_BATCH = 8  # images per observed forward during int8 calibration


def _images(source: ImageSource, size: int, indices: list[int], mean: torch.Tensor, std: torch.Tensor,
            batch: int = 1) -> Iterator[torch.Tensor]:
    """Normalized ``[B, 3, size, size]`` inputs: the evaluation's images (``EvalImages``, no labels)."""
    for b in DataLoader(EvalImages(source, indices, size, size, {}), batch_size=batch):
        yield prepare(b["image"], size, mean, std)


def run_export(cfg: Config, out: str | Path, encoder: str = "student", dtypes: list[str] | None = None,
               only: str | None = None) -> dict:
    """Every ``export.resolutions`` x dtype (fp32, and int8 with ``export.int8``), or only ``dtypes``; with
    ``only="multires"`` the multi-resolution program(s) alone (what a pipeline fanned out per size adds as
    one more element): the one-size programs are then lowered only to count their bytes, not written."""
    if encoder not in ENCODERS:
        raise EupeError(f"--encoder: expected one of {list(ENCODERS)}, got {encoder!r}")
    if only not in (None, "multires"):
        raise EupeError(f"--only: expected multires, got {only!r}")
    spec = getattr(cfg, encoder)
    ex = cfg.export
    if only == "multires" and len(ex.resolutions) < 2:
        raise EupeError(f"--only multires: export.resolutions {list(ex.resolutions)} holds one size; a "
                        "multi-resolution program needs two or more")
    if spec.weights is None:
        raise EupeError(f"{encoder}.weights: no trained weights to export (pass --weights, e.g. stage3/encoder.safetensors)")
    source = open_image_folder(cfg.data.root, "export (int8 calibration and the parity check)")
    check_weights(spec.weights, f"{encoder}.weights")

    def check() -> torch.nn.Module:  # weights that do not load, a size the model cannot take: before --out is touched
        model = build_model(spec, encoder).eval()  # our checkpoints: encoder.* only, adapters dropped
        for r in ex.resolutions:
            check_size(model, spec, r)
        return model

    run = StepRun(out, "export", fingerprint("export", {**data_inputs(cfg.data), f"{encoder}.weights": spec.weights},
                                             cfg, encoder=encoder, dtypes=dtypes,
                                             **({"only": only} if only else {})), check=check)
    if run.done:
        return run.done
    model = run.checked
    mean, std = model_inputs(model, torch.device("cpu"))
    n = len(source)
    parity_idx = list(range(max(0, n - ex.parity_images), n))  # the last images; calibration uses the first
    calib_idx = list(range(min(n, ex.calibration_images)))

    bounds = {"fp32": ex.fp32_min_cosine, "int8": ex.int8_min_cosine}
    variants = [(d, bounds[d]) for d in (dtypes or ["fp32"] + (["int8"] if ex.int8 else []))]
    static_int8 = ex.int8_activations == "static"
    models: dict[str, dict] = {}
    failures: list[str] = []

    built: dict[tuple[int, str], object] = {}  # (size, dtype) -> ExportedProgram, shared by the one-size and the
    # multi-resolution lowering (lowering reads an ExportedProgram, it does not change it): each size's graph is
    # exported, quantized and calibrated once

    def program(r: int, dtype: str):
        """The ExportedProgram of one size and dtype (built when lowering first asks for it)."""
        def build():
            if (r, dtype) not in built:
                calibration = (_images(source, r, calib_idx, mean, std, CALIBRATION_BATCH)
                               if dtype == "int8" and static_int8 else None)
                built[r, dtype] = to_program(cases[r][0], cases[r][1][:1], ex.int8_activations if dtype == "int8" else None,
                                             calibration)
            return built[r, dtype]
        return build

    def record(name: str, dtype: str, bound: float, lowered: Lowered, checks: dict[int, tuple[Forward, torch.Tensor, list]],
               export_s: float, **extra) -> dict:
        per_size = {}
        for r, (forward, x, reference) in checks.items():
            outputs = [forward(x[i : i + 1]) for i in range(len(x))]
            per_size[r] = parity(reference, [torch.cat(o) for o in zip(*outputs, strict=True)])
        row = {"dtype": dtype, **extra, "parity_cosine": min(p["cosine"] for p in per_size.values()),
               "parity_max_abs": max(p["max_abs"] for p in per_size.values()), "min_cosine": bound,
               "bytes": len(lowered.program), "export_s": round(export_s, 3), "delegated_nodes": lowered.delegated_nodes,
               "xnnpack_subgraphs": lowered.subgraphs, "non_delegated_ops": lowered.non_delegated}
        if len(checks) > 1:
            row["methods"] = {f"forward_{r}": {"input_shape": [1, 3, r, r], "parity_cosine": p["cosine"],
                                               "parity_max_abs": p["max_abs"]} for r, p in per_size.items()}
        problems = []
        if row["parity_cosine"] < bound:
            problems.append(f"parity cosine {row['parity_cosine']:.5f} < {bound} (export.{dtype}_min_cosine)")
        if ex.require_full_delegation and lowered.non_delegated:
            ops = ", ".join(f"{op} x{k}" for op, k in lowered.non_delegated.items())
            problems.append(f"not delegated to XNNPACK: {ops} (export.require_full_delegation)")
        row["passed"] = not problems
        failures.extend(f"{name}: {msg}" for msg in problems)
        storage.write_bytes(str(tmp / f"{name}.pte"), lowered.program)
        models[name] = {"pte": run.path(f"{name}.pte"), **row}
        log.info("%s: %.2f MiB, parity cosine %.6f, max abs %.3g, %.1fs, %d ops outside XNNPACK", name,
                 row["bytes"] / 2**20, row["parity_cosine"], row["parity_max_abs"], export_s,
                 sum(lowered.non_delegated.values()))
        return row

    single_bytes: dict[tuple[int, str], int] = {}
    cases: dict[int, tuple[torch.nn.Module, torch.Tensor, list]] = {}  # size -> (static graph, images, eager outputs)
    with run.staging() as tmp:
        for r in ex.resolutions:
            x = next(_images(source, r, parity_idx, mean, std, batch=len(parity_idx)))
            with torch.no_grad():
                reference = list(EncoderOutputs(model)(x))  # the trained model itself, dynamic size path
            cases[r] = (EncoderOutputs(fixed_size(model, spec, r)), x, reference)
            for dtype, bound in variants:
                name = f"{encoder}_{r}px_{dtype}"
                log.info("%s %s (%s, %d px, %s)", "sizing" if only else "exporting", name, spec.model, r, dtype)
                t0 = time.perf_counter()
                lowered = lower_methods({"forward": program(r, dtype)}, name)
                export_s = time.perf_counter() - t0
                single_bytes[r, dtype] = len(lowered.program)
                if only == "multires":  # only the bytes of the file the multi-resolution one stands for
                    continue
                forward = load_program(lowered.program, f"{name}.pte").method()
                record(name, dtype, bound, lowered, {r: (forward, x, reference)}, export_s,
                       input_shape=[1, 3, r, r], resolution=r)
        if only == "multires" or (ex.multi_resolution and len(ex.resolutions) > 1):
            for dtype, bound in variants:
                name = f"{encoder}_multires_{dtype}"
                log.info("exporting %s (%s, methods for %s px, %s)", name, spec.model, ex.resolutions, dtype)
                t0 = time.perf_counter()
                lowered = lower_methods({f"forward_{r}": program(r, dtype) for r in ex.resolutions}, name)
                export_s = time.perf_counter() - t0
                loaded = load_program(lowered.program, f"{name}.pte")
                singles = sum(single_bytes[r, dtype] for r in ex.resolutions)
                record(name, dtype, bound, lowered,
                       {r: (loaded.method(f"forward_{r}"), cases[r][1], cases[r][2]) for r in ex.resolutions}, export_s,
                       input_shape=None, resolutions=list(ex.resolutions), single_resolution_bytes=singles,
                       bytes_vs_single_files=round(len(lowered.program) / singles, 4))

        report = {
            "encoder": encoder, "model": spec.model, "weights": spec.weights,
            "input": {"layout": "NCHW float32, RGB in [0, 1] then (x - mean) / std",
                      "mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
            "outputs": ["cls [1, C]", "patches [1, N, D] (row-major token grid)"],
            "parity_images": len(parity_idx), "int8_activations": ex.int8_activations,
            "calibration_images": len(calib_idx) if ex.int8 and static_int8 else 0,
            "models": models,
        }
        storage.write_json(str(tmp / EXPORT_FILE), report)
        from eupe.export.plots import export_report

        export_report(models, tmp / "export.png")
        metrics: dict = {"models": len(models), "passed": not failures}
        for dtype, _ in variants:
            rows = [m for m in models.values() if m["dtype"] == dtype]
            metrics[f"parity_cosine_{dtype}"] = min(m["parity_cosine"] for m in rows)
            metrics[f"bytes_{dtype}"] = max(m["bytes"] for m in rows)
        artifacts = {"export": run.path(EXPORT_FILE), "plot": run.path("export.png"),
                     **{name: m["pte"] for name, m in models.items()}}
    result = run.finish(metrics, artifacts, status="failed" if failures else "ok")
    if failures:
        raise GateFailed(f"export failed ({run.path(EXPORT_FILE)}): {'; '.join(failures)}")
    return result
