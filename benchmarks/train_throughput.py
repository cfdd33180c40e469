"""Throughput of ONE stage-2 training step, measured against this machine's own matmul rate.

The step is the trainer's loop body for one micro-batch, from the trainer's own functions
(``build_distill_model``, ``build_optimizer``, ``target_batch``, ``student_loss``):

    frozen proxy   ``build_targets`` (registry ``build_model`` + ``freeze``): ViT-B/16 geometry, 256 px,
                   forward under ``torch.inference_mode`` via ``target_features``
    statistics     ``FeatureStats`` with zeros/ones (what ``eupe normalize`` would have written)
    student        ``build_distill_model``: ViT-S/16 @ 256 with one TargetAdapter (hidden 3072) for the proxy
    loss           ``distill_loss`` with the paper's ``LossConfig``
    optimizer      AdamW on ``param_groups``, grad clipping, ``warmup_cosine`` LR schedule

Models are randomly initialised (no downloads); FLOPs and time do not depend on the weights.

Printed, all from one run: images/s of the full step (median of ``--steps`` after ``--warmup``), FLOPs of
one step counted with ``torch.utils.flop_counter.FlopCounterMode``, achieved FLOP/s, the machine's
``torch.mm`` rate in the step's dtype at the same thread count, and the step's achieved FLOP/s as a fraction
of that rate, with the same numbers for the teacher forward and the student forward+backward alone.

``--precision fp32 bf16`` (the default) times the step in fp32 and under bf16 autocast (the trainer's
``precision: bf16``: teacher forward, student forward+backward and the loss's inputs under
``torch.autocast("cpu", torch.bfloat16)``, fp32 master weights and AdamW), the two steps interleaved
(fp32, bf16, fp32, bf16, ...) so that both see the same machine, and prints them side by side with the
speed-up and the two losses. Whether this CPU has native bf16 (AMX / AVX512-BF16, ``eupe.hardware``) is
printed with them: without it bf16 is emulated and slower than fp32.

    .venv/bin/python benchmarks/train_throughput.py [--batch 8] [--steps 5] [--precision fp32 bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from eupe import storage
from eupe.config import Config, ModelSpec
from eupe.distill.normalize import FeatureStats
from eupe.distill.targets import build_targets, model_inputs, prepare
from eupe.distill.trainer import build_distill_model, build_optimizer, draw_resolutions, student_loss, target_batch
from eupe.hardware import cpu_bf16
from eupe.models.features import feature_dims

sys.path.insert(0, str(Path(__file__).resolve().parent))
from args import non_negative, one_line_errors, output_file, positive, non_negative_number  # noqa: E402

STAGE = 2
PHASES = ("teacher", "student", "optim")  # teacher fwd | student fwd+bwd (adapter, loss) | clip+AdamW+sched
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- FLOP formulas the counter lacks on CPU ------------------------------------------------------
# PyTorch's counter knows the CUDA attention kernels only; on CPU, SDPA runs as
# ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), and under inference mode the
# dispatch mode sees ``scaled_dot_product_attention`` itself. Same formulas as the CUDA kernels.
def _bmm(b: int, m: int, k: int, n: int) -> int:
    return 2 * b * m * k * n


def _sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = q
    sk, dv = k[-2], v[-1]
    return _bmm(b * h, sq, d, sk) + _bmm(b * h, sq, sk, dv)


def _sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = q
    sk, dv = k[-2], v[-1]
    # recompute scores, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    return _bmm(b * h, sq, d, sk) + _bmm(b * h, sq, dv, sk) + _bmm(b * h, sk, sq, dv) + 2 * _bmm(b * h, sq, sk, d)


def _cpu_attention_flops() -> dict:
    aten = torch.ops.aten
    mapping = {aten.scaled_dot_product_attention: _sdpa_fwd}
    for name, f in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_fwd),
                    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_bwd)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = f
    return mapping


# --- the step ------------------------------------------------------------------------------------
class Stage2Step:
    """The trainer's per-step work for one micro-batch (accumulation 1), phase by phase."""

    def __init__(self, batch: int, size: int, hidden: int, teacher: str, student: str, seed: int = 0,
                 precision: str = "fp32"):
        torch.manual_seed(seed)
        self.precision = precision
        self.cfg = Config(
            seed=seed, device="cpu", precision=precision,
            proxy=ModelSpec(model=teacher, img_size=size),
            student=ModelSpec(model=student, img_size=size),
        )
        self.cfg = self.cfg.model_copy(update={"stage2": self.cfg.stage2.model_copy(update={
            "adapter_hidden": hidden, "resolutions": [size], "teacher_resolutions": [size],
            "batch_size": batch, "micro_batch_size": batch})})
        st = self.cfg.stage(STAGE)
        device = torch.device("cpu")
        self.targets = build_targets(self.cfg, STAGE, device)  # frozen, eval, requires_grad False
        self.stats = {}
        for t in self.targets:
            c, p = feature_dims(t.model, size)
            self.stats[t.name] = FeatureStats(torch.zeros(c), torch.ones(c), torch.zeros(p), torch.ones(p))
        self.model = build_distill_model(self.cfg, STAGE, self.stats, self.targets).to(device).train()
        self.s_mean, self.s_std = model_inputs(self.model.encoder, device)
        self.opt, self.sched = build_optimizer(self.model, st)
        self.grad_clip = st.grad_clip
        # The loader hands uint8 crops at the largest configured size (here == every model's size,
        # so ``prepare`` does not resample, as in the trainer's stage 2).
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        self.step_no = 0
        self.last_loss = float("nan")
        self.teacher_params = sum(p.numel() for t in self.targets for p in t.model.parameters())
        self.student_params = sum(p.numel() for p in self.model.parameters())

    def __call__(self, phase: Callable[[str], object] | None = None) -> dict[str, float]:
        """Run one step; ``phase(name)`` returns a context manager wrapped around each phase.
        Returns the wall time of each phase (seconds)."""
        ctx = phase or (lambda name: contextlib.nullcontext())
        cfg, targets, stats, images = self.cfg, self.targets, self.stats, self.images
        times = {}
        t0 = time.perf_counter()
        sizes = draw_resolutions(cfg, STAGE, self.step_no, targets)
        with ctx("teacher"), self.autocast():  # as the trainer's micro step: targets under autocast too
            grids, normed = target_batch(targets, stats, images, sizes)
        t1 = time.perf_counter()
        times["teacher"] = t1 - t0
        with ctx("student"):
            x = prepare(images, sizes["student"], self.s_mean, self.s_std)
            with self.autocast():
                loss, parts = student_loss(self.model, x, grids, normed, targets, cfg.loss)  # accumulation 1
            loss.backward()
            self.last_loss = loss.item()  # the trainer syncs on these too
            for v in parts.values():
                v.item()
        t2 = time.perf_counter()
        times["student"] = t2 - t1
        with ctx("optim"):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        times["optim"] = time.perf_counter() - t2
        times["step"] = time.perf_counter() - t0
        self.step_no += 1
        return times

    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer's ``Runtime.autocast`` on the CPU: bf16 autocast for ``precision: bf16``."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=DTYPES[self.precision])


def count_flops(step: Stage2Step) -> dict[str, int]:
    """FLOPs of one step, per phase, each phase under its own FlopCounterMode."""
    counters = {name: FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) for name in PHASES}
    step(phase=lambda name: counters[name])
    flops = {name: c.get_total_flops() for name, c in counters.items()}
    flops["step"] = sum(flops.values())
    return flops


class MatmulProbe:
    """``torch.mm`` of n x n matrices (fp32, or ``dtype``) at the current thread count. ``sample()`` times
    ``reps`` products and keeps their median; the benchmark samples before every timed step and after the last
    one, so the reference rate is measured under the same conditions as the steps it is compared with."""

    def __init__(self, n: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(0)
        self.n, self.reps = n, reps
        self.a, self.b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        self.c = torch.empty(n, n, dtype=dtype)
        self.samples: list[float] = []

    def sample(self) -> float:
        ts = []
        for _ in range(self.reps):
            t = time.perf_counter()
            torch.mm(self.a, self.b, out=self.c)
            ts.append(time.perf_counter() - t)
        rate = 2 * self.n**3 / statistics.median(ts)
        self.samples.append(rate)
        return rate


def matmul_rate(n: int = 2048, warmup: int = 2, reps: int = 7) -> float:
    """fp32 ``torch.mm`` FLOP/s of n x n matrices, median over ``reps`` (current thread count)."""
    probe = MatmulProbe(n, reps)
    for _ in range(warmup):
        torch.mm(probe.a, probe.b, out=probe.c)
    return probe.sample()


class OtherLoad:
    """CPU seconds that OTHER processes used while this one ran (Linux ``/proc/stat`` minus our own
    ``process_time``), as a number of cores. A shared machine makes a 2-thread OpenMP step several
    times slower, so the benchmark reports it instead of silently printing a low fraction."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), time.process_time()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> float | None:
        busy, wall = self._busy(), time.perf_counter() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0) - (time.process_time() - self.own0)) / wall


def spare_cpus(threads: int) -> float:
    """CPUs other processes may use without taking one from this benchmark's threads (+0.2 slack)."""
    return max(0, (os.cpu_count() or threads) - threads) + 0.2


def wait_idle(limit_s: float, threshold: float = 0.2, window_s: float = 3.0) -> tuple[bool, float]:
    """Wait up to ``limit_s`` for a ``window_s`` in which other processes use < ``threshold`` CPUs."""
    t0 = time.perf_counter()
    while True:
        probe = OtherLoad()
        time.sleep(window_s)
        other = probe.cores()
        if other is None or other < threshold:
            return True, time.perf_counter() - t0
        if time.perf_counter() - t0 >= limit_s:
            return False, time.perf_counter() - t0


def _rows(flops: dict[str, int], runs: list[dict[str, float]], batch: int, mm_rate: float) -> dict[str, dict]:
    med = {k: statistics.median(r[k] for r in runs) for k in (*PHASES, "step")}
    rows = {}
    for key, label in (("step", "full step"), ("teacher", "teacher fwd (inference)"),
                       ("student", "student fwd+bwd (+adapter, loss)"), ("optim", "clip + AdamW + sched")):
        rate = flops[key] / med[key] if med[key] > 0 else 0.0
        rows[key] = {
            "label": label, "seconds": med[key], "images_per_s": batch / med[key], "flops": flops[key],
            "flop_per_s": rate, "fraction_of_matmul": rate / mm_rate, "share_of_step_time": med[key] / med["step"],
        }
    return rows


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=positive, default=8, help="images per step (one micro-batch)")
    ap.add_argument("--steps", type=positive, default=5, help="timed steps per precision (median reported)")
    ap.add_argument("--warmup", type=non_negative, default=2, help="untimed steps first, per precision")
    ap.add_argument("--size", type=positive, default=256, help="teacher and student input size")
    ap.add_argument("--hidden", type=positive, default=Config().stage2.adapter_hidden, help="adapter MLP width")
    ap.add_argument("--teacher", default="vit_base_patch16_224", help="proxy geometry (timm name)")
    ap.add_argument("--student", default="vit_small_patch16_224", help="student (timm name)")
    ap.add_argument("--precision", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                    help="time the step in each (interleaved, side by side; default: fp32 bf16)")
    ap.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--matmul-n", type=positive, default=2048, help="size of the reference matmul")
    ap.add_argument("--wait-idle", type=non_negative_number, default=0.0, metavar="S",
                    help="first wait up to S seconds for other processes to leave the CPUs idle")
    ap.add_argument("--json", type=output_file, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    precisions = list(dict.fromkeys(args.precision))
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cpu = cpu_bf16()
    t_all = time.perf_counter()

    t_build = time.perf_counter()
    steps = {p: Stage2Step(args.batch, args.size, args.hidden, args.teacher, args.student, precision=p)
             for p in precisions}  # same seed: the same weights and images in every precision
    t_build = time.perf_counter() - t_build

    idle = None
    if args.wait_idle > 0:
        idle = wait_idle(args.wait_idle, spare_cpus(threads))
    probes = {p: MatmulProbe(args.matmul_n, dtype=DTYPES[p]) for p in precisions}
    for probe in probes.values():
        probe.sample()  # warms the BLAS up; not kept
        probe.samples.clear()
    for _ in range(args.warmup):
        for p in precisions:
            steps[p]()
    load = OtherLoad()
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in precisions}
    losses: dict[str, list[float]] = {p: [] for p in precisions}  # per timed step (the FLOP count adds one more)
    for _ in range(args.steps):  # interleaved: fp32, bf16, fp32, bf16, ... on the same machine state
        for p in precisions:
            probes[p].sample()
            runs[p].append(steps[p]())
            losses[p].append(steps[p].last_loss)
    for probe in probes.values():
        probe.sample()
    other_cores = load.cores()
    t_flops = time.perf_counter()
    flops = count_flops(steps[precisions[0]])  # the same operations in every precision
    t_flops = time.perf_counter() - t_flops

    per: dict[str, dict] = {}
    for p in precisions:
        if not all(math.isfinite(v) for v in losses[p]):
            raise SystemExit(f"the {p} step's loss is not finite ({losses[p]}): the benchmark measured a broken step")
        mm_rate = statistics.median(probes[p].samples)
        rows = _rows(flops, runs[p], args.batch, mm_rate)
        best = min(r["step"] for r in runs[p])
        per[p] = {"rows": rows, "matmul": {"n": args.matmul_n, "dtype": p, "flop_per_s": mm_rate,
                                            "samples": probes[p].samples},
                  "best_step_s": best, "best_step_fraction_of_best_matmul": flops["step"] / best / max(probes[p].samples),
                  "step_seconds_all": [r["step"] for r in runs[p]], "phase_seconds_all": runs[p],
                  "losses": losses[p], "last_loss": losses[p][-1]}
    wall = time.perf_counter() - t_all

    first = steps[precisions[0]]
    print(f"EUPE stage-2 step: {args.teacher} (frozen, {first.teacher_params / 1e6:.1f}M) -> {args.student} "
          f"+ TargetAdapter(hidden={args.hidden}) ({first.student_params / 1e6:.1f}M trainable), "
          f"{args.size}px, batch {args.batch}, {' and '.join(precisions)}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"CPU {cpu.model}: native bf16 {'yes' if cpu.native_bf16 else 'no'} ({cpu.evidence}; "
          f"torch capability {cpu.capability}); precision: auto would take {'bf16' if cpu.native_bf16 else 'fp32'}")
    print(f"torch {torch.__version__}, threads {threads}, warm-up {args.warmup}, median of {args.steps} steps"
          f"{' each, the precisions interleaved' if len(precisions) > 1 else ''}")
    for p in precisions:
        m = per[p]["matmul"]
        print(f"{p} torch.mm {args.matmul_n}x{args.matmul_n}: {m['flop_per_s'] / 1e9:.1f} GFLOP/s "
              f"(median of {len(m['samples'])} samples taken between the steps, "
              f"{min(m['samples']) / 1e9:.1f}-{max(m['samples']) / 1e9:.1f})")
    for p in precisions:
        rows = per[p]["rows"]
        print()
        hdr = f"{p + ' part':34s} {'ms':>9s} {'%time':>6s} {'img/s':>7s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'of mm':>6s}"
        print(hdr)
        print("-" * len(hdr))
        for r in rows.values():
            print(f"{r['label']:34s} {r['seconds'] * 1e3:9.1f} {r['share_of_step_time'] * 100:5.1f}% "
                  f"{r['images_per_s']:7.2f} {r['flops'] / 1e9:8.1f} {r['flop_per_s'] / 1e9:8.1f} "
                  f"{r['fraction_of_matmul'] * 100:5.1f}%")
        print(f"full step: {rows['step']['images_per_s']:.2f} img/s, {rows['step']['flop_per_s'] / 1e9:.1f} GFLOP/s "
              f"= {rows['step']['fraction_of_matmul'] * 100:.1f}% of the {p} matmul rate; best step "
              f"{args.batch / per[p]['best_step_s']:.2f} img/s = "
              f"{per[p]['best_step_fraction_of_best_matmul'] * 100:.1f}% of the best matmul sample; "
              f"steps (s): {' '.join(f'{t:.2f}' for t in per[p]['step_seconds_all'])}; loss {per[p]['last_loss']:.4f}")
    speedup = None
    if len(precisions) > 1:
        base = precisions[0]
        print()
        cols = "".join(f" {p + ' ms':>10s}" for p in precisions)
        ratios = "".join(f" {p + '/' + base:>10s}" for p in precisions[1:])
        hdr = f"{'side by side':34s}{cols}{ratios}"
        print(hdr)
        print("-" * len(hdr))
        for key, r in per[base]["rows"].items():
            ms = "".join(f" {per[p]['rows'][key]['seconds'] * 1e3:10.1f}" for p in precisions)
            xs = "".join(f" {r['seconds'] / per[p]['rows'][key]['seconds']:9.2f}x" for p in precisions[1:])
            print(f"{r['label']:34s}{ms}{xs}")
        imgs = "".join(f" {per[p]['rows']['step']['images_per_s']:10.2f}" for p in precisions)
        print(f"{'img/s (full step)':34s}{imgs}")
        last = "".join(f" {per[p]['last_loss']:10.4f}" for p in precisions)
        print(f"{'loss at the last timed step':34s}{last}")
        speedup = {p: per[base]["rows"]["step"]["seconds"] / per[p]["rows"]["step"]["seconds"] for p in precisions[1:]}
        print(" ".join(f"{p}: {x:.2f}x the {base} step rate, loss {per[p]['last_loss']:.4f} vs "
                       f"{per[base]['last_loss']:.4f} ({(per[p]['last_loss'] / per[base]['last_loss'] - 1) * 100:+.2f}%)"
                       for p, x in speedup.items()))
    print(f"build {t_build:.1f}s, FLOP count {t_flops:.1f}s, total {wall:.0f}s")
    if idle is not None:
        print(f"waited {idle[1]:.0f}s for idle CPUs: {'ok' if idle[0] else 'gave up, machine still busy'}")
    if other_cores is not None:
        print(f"other processes used {other_cores:.2f} of {os.cpu_count()} CPUs during the timed steps")
        if other_cores > spare_cpus(threads):
            print(f"WARNING: other processes took CPUs from this run's {threads} threads while timing; times and "
                  "fractions are not this step's own (rerun on an idle machine, with --wait-idle 300, "
                  "or with fewer --threads); the side-by-side ratio, interleaved, is the sturdier figure")

    head = per[precisions[0]]  # the top-level numbers: the first precision (fp32 by default), as before
    out = {
        "benchmark": "train_throughput", "stage": STAGE, "teacher": args.teacher, "student": args.student,
        "size": args.size, "batch": args.batch, "adapter_hidden": args.hidden,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[precisions[0]], "precisions": precisions,
        "threads": threads, "cpus": os.cpu_count(), "warmup_steps": args.warmup, "timed_steps": args.steps,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "cpu": cpu.as_dict(),
        "matmul": head["matmul"],
        "images_per_s": head["rows"]["step"]["images_per_s"], "flops_per_step": flops["step"],
        "flop_per_s": head["rows"]["step"]["flop_per_s"], "fraction_of_matmul": head["rows"]["step"]["fraction_of_matmul"],
        "best_step_fraction_of_best_matmul": head["best_step_fraction_of_best_matmul"],
        "parts": head["rows"], "step_seconds_all": head["step_seconds_all"],
        "phase_seconds_all": head["phase_seconds_all"], "other_processes_cpus": other_cores,
        "wall_s": wall, "last_loss": head["last_loss"],
        "by_precision": per, "speedup_vs_first": speedup,
    }
    if args.json:
        storage.write_json(str(args.json), out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
