"""The paper's training steps on a GPU: time, images/s, MFU and peak memory against ``eupe plan``'s estimate.

Two settings of ``configs/eupe_vit_b.yaml`` (random weights: time, FLOPs and memory do not depend on them), on
whatever GPU is present, bf16 autocast, each without and with ``torch.compile`` (``distributed.compile``: each
block of the trained encoder):

    stage 2   ViT-B student at 256 px with the frozen ViT-G proxy (1.9B) at 256 px
    stage 1   the ViT-G proxy trained against the three frozen teachers (1.9B, 1.7B, 0.84B) at 448/256 px

One rank, no accumulation (the stage's batch is one micro-batch): a step is the frozen targets' forward, the
student's forward and backward through its adapters, gradient clipping and the AdamW step, run by
``eupe.plan.step.run_step``, the very step ``eupe plan`` measures on fake tensors. Printed per row: median step
time over ``--steps`` after ``--warmup``, images/s, TFLOP per step (``torch.utils.flop_counter.FlopCounterMode``
on the real step, eager), achieved TFLOP/s and MFU against the GPU's published dense bf16 peak
(:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``), ``torch.cuda.max_memory_allocated`` over a step and the plan's
estimate of the same step (error = plan / measured - 1).

    .venv/bin/python benchmarks/gpu_step.py [--stage1-micro-batch 4] [--stage2-micro-batch 64] [--json out.json]
    .venv/bin/python benchmarks/gpu_step.py --device cpu --tiny --no-compile     # the same code on tiny models

Without a GPU (and without ``--device cpu``) it prints one line saying so and exits 0. On the CPU the peak
memory is the CPU allocator's (``eupe.plan.real.allocator_peak``) and the "peak FLOP/s" this machine's fp32
``torch.mm`` rate (``train_throughput.matmul_rate``) unless ``--peak-tflops`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from args import non_negative, output_file, positive  # noqa: E402
from train_throughput import _cpu_attention_flops, matmul_rate  # noqa: E402

from eupe.config import Config, load_config  # noqa: E402
from eupe.plan.recommend import size  # noqa: E402
from eupe.plan.step import OPTIONS, run_step  # noqa: E402

# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins (so "H100 PCIe" before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),  # H100 SXM
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0),
]
TINY = """
teachers:
  - {name: pecore, model: vit_pe_core_gigantic_patch14_448, img_size: 56, kwargs: {embed_dim: 96, depth: 2, num_heads: 2}}
  - {name: dinov3, model: vit_huge_plus_patch16_dinov3, img_size: 48, kwargs: {embed_dim: 80, depth: 2, num_heads: 2}}
proxy: {model: vit_pe_core_gigantic_patch14_448, img_size: 56, kwargs: {embed_dim: 128, depth: 2, num_heads: 2}}
student: {model: vit_t, img_size: 32, kwargs: {embed_dim: 96, depth: 2, num_heads: 2}}
stage1: {iters: 10, batch_size: 8, adapter_hidden: 64, resolutions: [56]}
stage2: {iters: 10, batch_size: 8, adapter_hidden: 64, resolutions: [32], teacher_resolutions: [32]}
"""


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak to take MFU against, and where it comes from."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cpu":
        return matmul_rate() / 1e12, "this CPU's fp32 torch.mm rate"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{key} published dense bf16"
    return None, f"{name}: unknown peak (pass --peak-tflops)"


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s)."""
    return None if not peak or seconds <= 0 else flops / seconds / (peak * 1e12)


def one_batch(cfg: Config, stage: int, micro_batch: int) -> Config:
    """The stage's batch is one micro-batch: no accumulation, every step a whole optimizer step."""
    st = cfg.stage(stage).model_copy(update={"batch_size": micro_batch, "micro_batch_size": micro_batch})
    return cfg.model_copy(update={f"stage{stage}": st, "precision": "bf16"})


def measure(cfg: Config, stage: int, micro_batch: int, device: torch.device, compile: bool, warmup: int,
            steps: int, count_flops: bool) -> dict:
    """Time, FLOPs and peak memory of the stage's step (one rank, ddp without DDP, no checkpointing)."""
    out: dict = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bench(step, models, opt) -> None:
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
            with counter:
                step()
            out["flops"] = counter.get_total_flops()
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        out["step_s"] = statistics.median(times)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync()
            out["peak"] = torch.cuda.max_memory_allocated(device)
        else:
            from eupe.plan.real import allocator_peak, held_at_start

            out["peak"] = held_at_start(models, opt) + allocator_peak(step)

    run_step(cfg, stage, OPTIONS[0], micro_batch, 1, fake=False, on_ready=bench, device=device, compile=compile)
    return out


def rows(cfg: Config, args: argparse.Namespace, device: torch.device) -> list[dict]:
    peak, source = peak_tflops(device, args.peak_tflops)
    out = []
    for stage, mb in ((2, args.stage2_micro_batch), (1, args.stage1_micro_batch)):
        c = one_batch(cfg, stage, mb)
        plan = run_step(c, stage, OPTIONS[0], mb, 1).peak  # eupe plan's estimate: fake tensors, same step
        flops = None
        for compile in (False, True) if args.compile else (False,):
            r = measure(c, stage, mb, device, compile, args.warmup, args.steps, count_flops=flops is None)
            flops = r.get("flops", flops)
            u = mfu(flops, r["step_s"], peak)
            out.append({"stage": stage, "micro_batch": mb, "compile": compile, "step_s": r["step_s"],
                        "images_per_s": mb / r["step_s"], "tflop_per_step": flops / 1e12,
                        "tflops": flops / r["step_s"] / 1e12, "mfu": u, "peak_tflops": peak, "peak_source": source,
                        "peak_memory": r["peak"], "plan_memory": plan, "plan_error": plan / r["peak"] - 1})
            print(row_text(out[-1]), flush=True)
    return out


HEADER = (f"{'stage':<6}{'micro':>6}{'compile':>8}{'step ms':>9}{'img/s':>8}{'TFLOP':>9}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak mem':>11}{'plan':>11}{'plan err':>9}")


def row_text(r: dict) -> str:
    mfu_text = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    return (f"{r['stage']:<6}{r['micro_batch']:>6}{str(r['compile']).lower():>8}{r['step_s'] * 1e3:>9.1f}"
            f"{r['images_per_s']:>8.1f}{r['tflop_per_step']:>9.4f}{r['tflops']:>9.2f}{mfu_text:>7}"
            f"{size(r['peak_memory']):>11}{size(r['plan_memory']):>11}{r['plan_error']:>+9.1%}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", default=str(ROOT / "configs/eupe_vit_b.yaml"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny models of the same families (the CPU check)")
    p.add_argument("--stage1-micro-batch", type=positive, default=4, help="stage 1 images per step (default 4: one "
                   "80 GiB GPU holds the proxy's fp32 weights, gradients and moments and the three teachers)")
    p.add_argument("--stage2-micro-batch", type=positive, default=64)
    p.add_argument("--warmup", type=non_negative, default=3, help="steps before timing (compilation happens here)")
    p.add_argument("--steps", type=positive, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager rows only")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--threads", type=positive, default=1, help="CPU threads with --device cpu (default 1: a shared "
                   "CPU slows OpenMP threads down several-fold, and per-thread kernel buffers blur the memory)")
    p.add_argument("--json", type=output_file, help="write the rows here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step: no CUDA GPU visible; nothing measured (--device cpu --tiny runs the same code on the CPU)")
        return 0
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.tiny:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(TINY)
        cfg = load_config(f.name)
    else:
        cfg = load_config(args.config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    recipe = "tiny" if args.tiny else Path(args.config).name
    print(f"gpu_step: {name}, torch {torch.__version__}, bf16 autocast, {recipe}")
    print(HEADER)
    out = rows(cfg, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
