"""Running a ``.pte`` with the ExecuTorch runtime of this machine: load, execute, compare, time."""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eupe.errors import EupeError
from eupe.native_log import native_cause, quiet_native_stderr


def first_line(e: BaseException) -> str:
    """``Type: first non-empty line`` of an exception's message (200 characters at most)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


class Program:
    """A loaded ``.pte`` and its methods: ``forward``, or one per input size (``forward_256``, ...) in a
    multi-resolution program. Holds the program: a method points into it, and executing it after the
    program was garbage-collected crashes the process."""

    def __init__(self, pte: bytes | Path, name: str = "<buffer>"):
        from executorch.runtime import Runtime

        self.name = name
        native: list[bytes] = []  # the runtime logs why it refuses a program ("Verification failed; ...")
        try:
            with quiet_native_stderr(into=native):
                self.program = Runtime.get().load_program(pte if isinstance(pte, bytes) else Path(pte))
        except (RuntimeError, ValueError, KeyError) as e:
            cause = native_cause(native)
            raise EupeError(f"cannot load {name} with the ExecuTorch runtime: {first_line(e)}"
                            + (f" ({cause})" if cause else "")) from None
        if native:
            sys.stderr.write(b"".join(native).decode(errors="replace"))
        self.names = sorted(self.program.method_names, key=lambda m: (len(m), m))  # forward_256 before forward_1024

    def method(self, method: str = "forward") -> Forward:
        if method not in self.names:
            raise EupeError(f"{self.name}: no method {method!r} (the program has {', '.join(self.names)})")
        return Forward(self, method)

    def methods(self) -> dict[str, Forward]:
        return {m: self.method(m) for m in self.names}


class Forward:
    """One method of a loaded :class:`Program`, called with an image batch ``[1, 3, R, R]``."""

    def __init__(self, program: Program, method: str = "forward"):
        self.owner = program  # keeps the program alive while this method is used
        self.method_name = method
        self.name = program.name if method == "forward" else f"{program.name}:{method}"
        try:
            with quiet_native_stderr():  # the thread pool's cpuinfo chatter, once per process
                self.method = program.program.load_method(method)
        except (RuntimeError, ValueError, KeyError) as e:
            raise EupeError(f"cannot load {self.name} with the ExecuTorch runtime: {first_line(e)}") from None

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


def load_program(pte: bytes | Path, name: str = "<buffer>") -> Program:
    return Program(pte, name)


def load_forward(pte: bytes | Path, name: str = "<buffer>", method: str = "forward") -> Forward:
    return Program(pte, name).method(method)


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


def image_methods(program: Program, uri: str, resolution: int | None = None) -> dict[int, Forward]:
    """``{R: method}`` of a program whose methods each take one square image ``[1, 3, R, R]`` (``forward``,
    or ``forward_<R>`` per size of a multi-resolution program), smallest first; ``resolution`` keeps that
    size only (a size the program does not take fails in one line)."""
    methods: dict[int, Forward] = {}
    for name in program.names:
        forward = program.method(name)
        shape = forward.input_shape
        if len(shape) != 4 or shape[-1] != shape[-2]:
            raise EupeError(f"{uri}: expected a square image input [1, 3, R, R], the program takes {list(shape)}")
        methods[shape[-1]] = forward
    methods = dict(sorted(methods.items()))
    if resolution is not None and resolution not in methods:
        takes = ", ".join(f"{r} px inputs {list(f.input_shape)}" for r, f in methods.items())
        raise EupeError(f"--resolution {resolution}: {uri} takes {takes}")
    return {resolution: methods[resolution]} if resolution is not None else methods
