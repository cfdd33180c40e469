"""Which micro-batch, sharding and checkpointing fit a GPU: a search over measured steps.

Every number here is a measured step (:func:`eupe.plan.step.run_step`); the search only decides which steps to
measure. Per stage:

1. every option (``ddp``, ``fsdp``, each with and without activation checkpointing) at the config's micro-batch:
   the table;
2. the options in order of preference, fastest first: ``ddp`` (no gathers, no recomputation), ``fsdp`` (gathers
   overlap the compute), ``ddp+ac``, ``fsdp+ac`` (recomputation costs about a third of the trained encoder's
   compute). The first whose largest fitting micro-batch is at least ``min_micro_batch`` is recommended; when
   none reaches it, the option with the largest fitting micro-batch; when nothing fits at micro-batch 1 the
   stage cannot run on this GPU.

Micro-batches are taken from a divisor chain of the per-rank batch (``batch_size / world_size``): its
power-of-two divisors, then the per-rank batch itself, so the accumulation is a whole number. The largest
fitting one is found by bisection guided by a straight line through the two nearest measured points (peak
memory grows with the micro-batch almost exactly linearly); the recommended micro-batch is always one that was
measured to fit, and its successor one measured not to fit or predicted by that line to exceed the budget by
more than 5%.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from eupe.config import Config
from eupe.errors import EupeError
from eupe.plan.step import OPTIONS, Measurement, Option, run_step

log = logging.getLogger(__name__)
GIB = 2**30
_UNITS = {"": GIB, "gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}
PREFERENCE = ("ddp", "fsdp", "ddp+ac", "fsdp+ac")


def parse_memory(text: str) -> int:
    """``80GiB``, ``80GB``, ``81920MiB`` or ``80`` (GiB) -> bytes; anything else is one line."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise EupeError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 80GB or 81920MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def chain(per_rank: int) -> list[int]:
    """Micro-batches that split the per-rank batch, each dividing the next: 1, 2, 4, ... and the batch itself."""
    out = [1 << k for k in range(per_rank.bit_length()) if per_rank % (1 << k) == 0]
    return out + ([per_rank] if out[-1] != per_rank else [])


def per_rank_batch(cfg: Config, stage: int, world_size: int) -> int:
    batch = cfg.stage(stage).batch_size
    if batch % world_size:
        raise EupeError(f"stage{stage}.batch_size {batch} does not split into {world_size} GPUs")
    return batch // world_size


@dataclass
class StagePlan:
    stage: int
    world_size: int
    budget: int  # bytes a step may use on one GPU (its memory less the headroom)
    table: list[Measurement] = field(default_factory=list)  # every option at the config's micro-batch
    probes: list[Measurement] = field(default_factory=list)  # every step measured for the search
    choice: Measurement | None = None  # the recommendation (a measured step that fits)
    largest: dict[str, int] = field(default_factory=dict)  # option -> largest fitting micro-batch (0: none)


class Planner:
    """Measures steps of one config on ``world_size`` GPUs of ``budget`` bytes each, every step at most once."""

    def __init__(self, cfg: Config, world_size: int, budget: int, min_micro_batch: int = 8, measure=run_step):
        self.cfg, self.world_size, self.budget, self.min_micro = cfg, world_size, budget, min_micro_batch
        self._measure = measure
        self._done: dict[tuple[int, str, int], Measurement] = {}

    def options(self) -> list[Option]:
        if self.world_size == 1:  # one GPU: no DDP, nothing to shard over
            return [o for o in OPTIONS if o.strategy == "ddp"]
        return list(OPTIONS)

    def measure(self, stage: int, option: Option, micro_batch: int) -> Measurement:
        key = (stage, option.label, micro_batch)
        if key not in self._done:
            m = self._measure(self.cfg, stage, option, micro_batch, self.world_size)
            log.info("stage%d %-7s micro-batch %4d: %.2f GiB (%s; measured in %.0f s)", stage, option.label,
                     micro_batch, m.peak / GIB, m.phase, m.seconds)
            self._done[key] = m
        return self._done[key]

    def fits(self, m: Measurement) -> bool:
        return m.peak <= self.budget

    def largest_fit(self, stage: int, option: Option, sizes: list[int]) -> int:
        """The largest of ``sizes`` (ascending) whose step fits, or 0."""
        lo, hi = -1, len(sizes)  # sizes[lo] fits, sizes[hi] does not (measured or, for hi, predicted)
        for i, mb in enumerate(sizes):
            known = self._done.get((stage, option.label, mb))
            if known is not None:
                lo, hi = (max(lo, i), hi) if self.fits(known) else (lo, min(hi, i))
        while hi - lo > 1:
            j = self._next_probe(stage, option, sizes, lo, hi)
            if self.fits(self.measure(stage, option, sizes[j])):
                lo = j
                if hi - lo > 1 and self._predicted_over(stage, option, sizes[lo + 1]):
                    hi = lo + 1
            else:
                hi = j
        return sizes[lo] if lo >= 0 else 0

    def _points(self, stage: int, option: Option) -> list[tuple[int, int]]:
        return sorted((mb, m.peak) for (s, label, mb), m in self._done.items() if s == stage and label == option.label)

    def _line(self, stage: int, option: Option, near: int) -> tuple[float, float] | None:
        """Peak = a + b * micro_batch through the two measured points nearest ``near``."""
        pts = sorted(self._points(stage, option), key=lambda p: abs(p[0] - near))[:2]
        if len(pts) < 2 or pts[0][0] == pts[1][0]:
            return None
        (x0, y0), (x1, y1) = pts
        b = (y1 - y0) / (x1 - x0)
        return y0 - b * x0, b

    def _predicted_over(self, stage: int, option: Option, micro_batch: int) -> bool:
        line = self._line(stage, option, micro_batch)
        return line is not None and line[0] + line[1] * micro_batch > 1.05 * self.budget

    def _next_probe(self, stage: int, option: Option, sizes: list[int], lo: int, hi: int) -> int:
        line = self._line(stage, option, sizes[max(lo, 0)])
        if line is not None and line[1] > 0:
            target = (self.budget - line[0]) / line[1]
            j = max((i for i, mb in enumerate(sizes) if mb <= target), default=0)
        else:  # one point: the next size up when it fits, the bottom one when it does not (does it fit at all?)
            j = lo + 1
        return min(max(j, lo + 1), hi - 1)

    def plan_stage(self, stage: int) -> StagePlan:
        per_rank = per_rank_batch(self.cfg, stage, self.world_size)
        sizes = chain(per_rank)
        m0 = self.cfg.stage(stage).micro_batch_size
        if per_rank % m0:
            raise EupeError(f"stage{stage}.micro_batch_size {m0} does not split the per-GPU batch {per_rank} "
                            f"({self.cfg.stage(stage).batch_size} / {self.world_size} GPUs)")
        if m0 not in sizes:
            sizes = sorted({*sizes, m0})
        plan = StagePlan(stage, self.world_size, self.budget)
        options = {o.label: o for o in self.options()}
        plan.table = [self.measure(stage, o, m0) for o in options.values()]
        floor = min(self.min_micro, per_rank)
        for label in (p for p in PREFERENCE if p in options):
            best = self.largest_fit(stage, options[label], [s for s in sizes if s >= floor])
            plan.largest[label] = best
            if best:
                plan.choice = self.measure(stage, options[label], best)
                break
        if plan.choice is None:  # nothing reaches min_micro_batch: the leanest option, below it
            lean = min(plan.table, key=lambda m: m.peak).option
            best = self.largest_fit(stage, options[lean], [s for s in sizes if s < floor])
            plan.largest[lean] = best
            if best:
                plan.choice = self.measure(stage, options[lean], best)
        plan.probes = sorted((m for (s, *_), m in self._done.items() if s == stage),
                             key=lambda m: (m.option, m.micro_batch))
        return plan


def unfit_message(plan: StagePlan, gpu_memory: int) -> str:
    """One line: the stage that cannot run and how far the leanest step is from fitting."""
    leanest = min(plan.probes, key=lambda m: (m.micro_batch, m.peak))
    return (f"stage {plan.stage} does not fit {gpu_memory / GIB:g} GiB per GPU on {plan.world_size} GPU(s): even "
            f"{leanest.option} at micro-batch {leanest.micro_batch} needs {leanest.peak / GIB:.1f} GiB "
            f"(budget {plan.budget / GIB:.1f} GiB after headroom); use more GPUs or a larger GPU")
