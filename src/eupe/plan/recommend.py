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

    def _guess(self, stage: int, option: Option) -> tuple[float, float] | None:
        """With one measured step: its activations and backward temporaries taken as growing with the
        micro-batch, the rest as fixed (only to choose the next step to measure)."""
        pts = [m for (s, label, _), m in self._done.items() if s == stage and label == option.label]
        if len(pts) != 1:
            return None
        m = pts[0]
        per_image = (m.parts.get("activations", 0) + m.parts.get("backward temporaries", 0)) / m.micro_batch
        return (m.peak - per_image * m.micro_batch, per_image) if per_image > 0 else None

    def _predicted_over(self, stage: int, option: Option, micro_batch: int) -> bool:
        line = self._line(stage, option, micro_batch)
        return line is not None and line[0] + line[1] * micro_batch > 1.05 * self.budget

    def _next_probe(self, stage: int, option: Option, sizes: list[int], lo: int, hi: int) -> int:
        line = self._line(stage, option, sizes[max(lo, 0)]) or self._guess(stage, option)
        if line is not None and line[1] > 0:
            target = (self.budget - line[0]) / line[1]
            j = max((i for i, mb in enumerate(sizes) if mb <= target), default=0)
        else:  # one point: the next size up when it fits, the bottom one when it does not (does it fit at all?)
            j = lo + 1
        return min(max(j, lo + 1), hi - 1)

    def sizes(self, stage: int) -> list[int]:
        """The micro-batches to choose from: the divisor chain, and the config's when it splits the batch too."""
        per_rank = per_rank_batch(self.cfg, stage, self.world_size)
        m0 = self.cfg.stage(stage).micro_batch_size
        return sorted({*chain(per_rank), *([m0] if per_rank % m0 == 0 else [])})

    def table_micro_batch(self, stage: int) -> int:
        """The config's micro-batch, or, when it does not split the per-GPU batch on this many GPUs, the largest
        of the chain below it (the trainer would refuse the config's: the table says what to set instead)."""
        m0 = self.cfg.stage(stage).micro_batch_size
        sizes = self.sizes(stage)
        if m0 in sizes:
            return m0
        fallback = max((s for s in sizes if s <= m0), default=sizes[0])
        log.warning("stage%d.micro_batch_size %d does not split the per-GPU batch %d on %d GPUs: the table is at %d",
                    stage, m0, max(sizes), self.world_size, fallback)
        return fallback

    def table(self, stage: int) -> StagePlan:
        """Every option at the config's micro-batch."""
        plan = StagePlan(stage, self.world_size, self.budget)
        m0 = self.table_micro_batch(stage)
        plan.table = [self.measure(stage, o, m0) for o in self.options()]
        return plan

    def recommend(self, plans: list[StagePlan]) -> str | None:
        """One ``distributed`` setting for every stage (the config has one): the first option in order of
        preference under which every stage fits at least ``min_micro_batch`` (or its whole per-GPU batch), each
        stage at its largest fitting micro-batch; when there is none, the leanest option below that. Sets each
        plan's ``choice``; returns the option, or None when some stage fits at no micro-batch (its ``choice`` is
        then None)."""
        options = {o.label: o for o in self.options()}
        floors = {p.stage: min(self.min_micro, max(self.sizes(p.stage))) for p in plans}
        for label in (p for p in PREFERENCE if p in options):
            best = {}
            for p in sorted(plans, key=lambda p: p.stage):  # stage 1, the largest, first: it rules most out
                best[p.stage] = self.largest_fit(p.stage, options[label], [s for s in self.sizes(p.stage)
                                                                           if s >= floors[p.stage]])
                p.largest[label] = best[p.stage]
                if not best[p.stage]:
                    break
            if all(best.get(p.stage) for p in plans):
                return self._choose(plans, options[label], best)
        lean = min(plans[0].table, key=lambda m: m.peak).option  # fsdp+ac (ddp+ac on one GPU)
        best = {p.stage: self.largest_fit(p.stage, options[lean], self.sizes(p.stage)) for p in plans}
        for p in plans:
            p.largest[lean] = best[p.stage]
        return self._choose(plans, options[lean], best) if all(best.values()) else None

    def _choose(self, plans: list[StagePlan], option: Option, best: dict[int, int]) -> str:
        for p in plans:
            p.choice = self.measure(p.stage, option, best[p.stage])
        return option.label

    def finish(self, plans: list[StagePlan]) -> None:
        for p in plans:
            p.probes = sorted((m for (s, *_), m in self._done.items() if s == p.stage),
                              key=lambda m: (m.option, m.micro_batch))


def size(n: int) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB."""
    return f"{n / GIB:.3g} GiB" if n >= GIB / 10 else f"{n / 2**20:.3g} MiB"


def unfit_message(plans: list[StagePlan], gpu_memory: int) -> str:
    """One line: the stage that cannot run and how far its leanest step is from fitting."""
    plan = next(p for p in plans if not any(p.largest.values()))
    leanest = min(plan.probes, key=lambda m: (m.micro_batch, m.peak))
    return (f"stage {plan.stage} does not fit {size(gpu_memory)} per GPU on {plan.world_size} GPU(s): even "
            f"{leanest.option} at micro-batch {leanest.micro_batch} needs {size(leanest.peak)} (budget "
            f"{size(plan.budget)} after headroom); use more GPUs or GPUs with more memory")
