"""The same step on real CPU tensors, its peak read from the CPU allocator: what the plan is checked against.

PyTorch keeps no peak statistics for the CPU allocator, but its profiler records every allocation and free the
allocator makes (``profile_memory=True``: ``[memory]`` events with signed byte counts). The peak of the step is
the memory held when it starts (every tensor it can reach: parameters, gradients, optimizer state, targets,
statistics) plus the highest running sum of those events. This counts what the allocator hands out, including
what the tracker cannot see (buffers kernels allocate for themselves), and nothing of the tracker's.
"""

from __future__ import annotations

import torch

from eupe.config import Config
from eupe.plan.step import Measurement, Option, run_step


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_at_start(m, opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the step starts with."""
    tensors = [*m.model.parameters(), *m.model.buffers(), *m.constants()]
    tensors += [p.grad for p in m.model.parameters() if p.grad is not None]
    tensors += [v for state in opt.state.values() for v in state.values()]
    for t in m.targets:
        tensors += [*t.model.parameters(), *t.model.buffers()]
    return _storage_bytes(tensors)


def allocator_peak(fn) -> int:
    """Highest net bytes the CPU allocator handed out while ``fn()`` ran (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, n in events:
        held += n
        peak = max(peak, held)
    return peak


def real_step(cfg: Config, stage: int, option: Option, micro_batch: int) -> Measurement:
    """The plan's step for one process on real CPU tensors; ``peak`` from the allocator, not from the tracker."""
    result: dict[str, int] = {}

    def measure(step, m, opt) -> None:
        step()  # a first step outside the measure: lazily made state (autocast caches, kernels) exists
        for p in m.model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p) if result.get("keep_grads") else None
        start = held_at_start(m, opt)
        result["peak"] = start + allocator_peak(step)

    accum = cfg.stage(stage).batch_size // micro_batch
    result["keep_grads"] = int(accum > 1)
    out = run_step(cfg, stage, option, micro_batch, 1, fake=False, on_ready=measure)
    out.peak = result["peak"]
    out.phase = "real CPU run (allocator)"
    return out
