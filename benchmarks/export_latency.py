"""Edge latency of the ViT-T and ViT-S students at 256 px on THIS machine, in one run: eager PyTorch,
ExecuTorch fp32 and ExecuTorch int8 (XNNPACK), median ms of batch-1 forwards, each as a multiple of
the FLOP floor.

The exported graph is the one ``eupe export`` writes (``eupe.export.lower``: ``fixed_size`` +
``EncoderOutputs`` -> ``lower``), timed with ``eupe.export.runtime.time_runs`` as ``eupe latency``
does (eager PyTorch too). FLOP floor = the model's forward FLOPs (``torch.utils.flop_counter.FlopCounterMode``, CPU
attention counted as in ``benchmarks/train_throughput.py``) / this machine's fp32 ``torch.mm`` rate,
measured in the same run (2048 x 2048, before and after the timings). Models are randomly
initialised (latency does not depend on the weights); int8 is calibrated on random images.

    .venv/bin/python benchmarks/export_latency.py [--models vit_t vit_s] [--size 256] [--runs 20] [--threads N]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _cpu_attention_flops, matmul_rate  # noqa: E402

from eupe import storage  # noqa: E402
from eupe.config import ModelSpec  # noqa: E402
from eupe.export.lower import EncoderOutputs, fixed_size, lower  # noqa: E402
from eupe.export.runtime import load_forward, threads, time_runs  # noqa: E402
from eupe.models.registry import build_model  # noqa: E402


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with torch.inference_mode(), counter:
        module(x)
    return counter.get_total_flops()


def bench_model(name: str, size: int, warmup: int, runs: int, calibration: int) -> dict:
    torch.manual_seed(0)
    spec = ModelSpec(model=name, img_size=size)
    model = build_model(spec).eval()
    eager = EncoderOutputs(model).eval()
    x = torch.randn(1, 3, size, size)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "flops": forward_flops(eager, x)}
    with torch.inference_mode():
        row["eager_ms"] = statistics.median(time_runs(lambda: eager(x), warmup, runs))
    static = EncoderOutputs(fixed_size(model, spec, size))
    g = torch.Generator().manual_seed(1)
    for dtype in ("fp32", "int8"):
        calib = [torch.randn(1, 3, size, size, generator=g) for _ in range(calibration)] if dtype == "int8" else None
        t = time.perf_counter()
        lowered = lower(static, x, calib, f"{name}_{dtype}")
        row[f"{dtype}_export_s"] = time.perf_counter() - t
        row[f"{dtype}_bytes"] = len(lowered.program)
        row[f"{dtype}_non_delegated"] = lowered.non_delegated
        forward = load_forward(lowered.program, f"{name}_{dtype}")
        row[f"{dtype}_ms"] = statistics.median(time_runs(functools.partial(forward, x), warmup, runs))
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_t", "vit_s"], help="student aliases or timm names")
    ap.add_argument("--size", type=int, default=256, help="input resolution (px)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20, help="timed batch-1 forwards (median reported)")
    ap.add_argument("--calibration", type=int, default=8, help="random images for int8 calibration")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch AND the ExecuTorch threadpool (default: each library's own)")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        from executorch.extension.pybindings import portable_lib

        torch.set_num_threads(args.threads)
        portable_lib._unsafe_reset_threadpool(args.threads)

    mm_before = matmul_rate(args.matmul_n)
    rows = [bench_model(m, args.size, args.warmup, args.runs, args.calibration) for m in args.models]
    mm_after = matmul_rate(args.matmul_n)
    mm = statistics.median([mm_before, mm_after])
    for r in rows:
        r["floor_ms"] = r["flops"] / mm * 1e3
        for k in ("eager", "fp32", "int8"):
            r[f"{k}_x_floor"] = r[f"{k}_ms"] / r["floor_ms"]

    print(f"EUPE students at {args.size}px, batch 1, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), ExecuTorch {threads()} threads, "
          f"median of {args.runs} runs after {args.warmup}")
    print(f"fp32 torch.mm {args.matmul_n}x{args.matmul_n}: {mm_before / 1e9:.1f} GFLOP/s before, "
          f"{mm_after / 1e9:.1f} after (floor uses {mm / 1e9:.1f})")
    print()
    hdr = (f"{'model':8s} {'params':>7s} {'GFLOP':>6s} {'floor ms':>9s} | {'eager ms':>9s} {'x':>5s} | "
           f"{'ET fp32 ms':>10s} {'x':>5s} | {'ET int8 ms':>10s} {'x':>5s} | {'MiB fp32/int8':>13s} {'export s':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model']:8s} {r['params'] / 1e6:6.1f}M {r['flops'] / 1e9:6.2f} {r['floor_ms']:9.2f} | "
              f"{r['eager_ms']:9.2f} {r['eager_x_floor']:5.1f} | {r['fp32_ms']:10.2f} {r['fp32_x_floor']:5.1f} | "
              f"{r['int8_ms']:10.2f} {r['int8_x_floor']:5.1f} | "
              f"{r['fp32_bytes'] / 2**20:6.1f}/{r['int8_bytes'] / 2**20:<6.1f} "
              f"{r['fp32_export_s']:4.0f}/{r['int8_export_s']:<4.0f}")
    for r in rows:
        if r["fp32_non_delegated"]:
            print(f"{r['model']}: left to portable kernels (fp32): "
                  + ", ".join(f"{k} x{v}" for k, v in r["fp32_non_delegated"].items()))

    out = {"benchmark": "export_latency", "size": args.size, "warmup": args.warmup, "runs": args.runs,
           "threads": torch.get_num_threads(), "executorch_threads": threads(), "torch": torch.__version__,
           "machine": platform.machine(),
           "matmul": {"n": args.matmul_n, "flop_per_s_before": mm_before, "flop_per_s_after": mm_after}, "rows": rows}
    if args.json:
        storage.write_json(str(args.json), out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
