"""Running a ``.pte`` with the ExecuTorch runtime of this machine: load, execute, compare, time."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eupe.errors import EupeError


def first_line(e: BaseException) -> str:
    """``Type: first non-empty line`` of an exception's message (200 characters at most)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


class Forward:
    """The ``forward`` method of a loaded program. Holds the program too: the method points into it, and
    executing it after the program was garbage-collected crashes the process."""

    def __init__(self, pte: bytes | Path, name: str = "<buffer>"):
        from executorch.runtime import Runtime

        self.name = name
        try:
            self.program = Runtime.get().load_program(pte if isinstance(pte, bytes) else Path(pte))
            self.method = self.program.load_method("forward")
        except (RuntimeError, ValueError, KeyError) as e:
            raise EupeError(f"cannot load {name} with the ExecuTorch runtime: {first_line(e)}") from None

    @functools.cached_property
    def input_shape(self) -> tuple[int, ...]:
        meta = self.method.metadata
        if meta.num_inputs() != 1:
            raise EupeError(f"{self.name}: expected a program with one image input, this one takes {meta.num_inputs()}")
        return tuple(meta.input_tensor_meta(0).sizes())

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape) != self.input_shape or x.dtype != torch.float32:
            raise EupeError(f"{self.name}: ExecuTorch execute failed: input {x.dtype} {list(x.shape)}, "
                            f"the program takes float32 {list(self.input_shape)}")
        try:
            return list(self.method.execute([x.contiguous()]))
        except Exception as e:  # noqa: BLE001 -- the runtime raises RuntimeError/ValueError with a multi-line log
            raise EupeError(f"{self.name}: ExecuTorch execute failed: {first_line(e)}") from None


def load_forward(pte: bytes | Path, name: str = "<buffer>") -> Forward:
    return Forward(pte, name)


def threads() -> int:
    """Threads of the runtime's threadpool (XNNPACK runs on it)."""
    from executorch.extension.pybindings import portable_lib

    return portable_lib._threadpool_get_thread_count()


def parity(reference: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> dict[str, float]:
    """Cosine between the flattened outputs (the lowest over outputs and images, dim 0 is the image)
    and the largest absolute difference."""
    cos, err = [], []
    for ref, out in zip(reference, got, strict=True):
        ref, out = ref.detach().float(), out.detach().float()
        if ref.shape != out.shape:
            raise EupeError(f"parity: output of shape {tuple(out.shape)}, eager PyTorch gives {tuple(ref.shape)}")
        cos.append(F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1, eps=1e-12).min().item())
        err.append((out - ref).abs().max().item())
    return {"cosine": min(cos), "max_abs": max(err)}


def time_runs(fn: Callable[[], Any], warmup: int, runs: int) -> list[float]:
    """Wall time of ``fn()`` in ms: ``warmup`` untimed calls, then ``runs`` timed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def summary(runs_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90 (linear interpolation between order statistics), mean and minimum of run times."""
    return {"median_ms": statistics.median(runs_ms), "p90_ms": float(np.percentile(runs_ms, 90)),
            "mean_ms": statistics.fmean(runs_ms), "min_ms": min(runs_ms)}
