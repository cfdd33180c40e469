"""Running a ``.pte`` with the ExecuTorch runtime of this machine: load, execute, compare, time."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eupe.errors import EupeError


def load_forward(pte: bytes | Path, name: str = "<buffer>") -> Any:
    """The ``forward`` method of a program (an ``executorch.runtime.Method``)."""
    from executorch.runtime import Runtime

    try:
        program = Runtime.get().load_program(pte if isinstance(pte, bytes) else Path(pte))
        return program.load_method("forward")
    except (RuntimeError, ValueError, KeyError) as e:
        raise EupeError(f"cannot load {name} with the ExecuTorch runtime: {str(e).splitlines()[0][:200]}") from None


def threads() -> int:
    """Threads of the runtime's threadpool (XNNPACK runs on it)."""
    from executorch.extension.pybindings import portable_lib

    return portable_lib._threadpool_get_thread_count()


def input_shape(method: Any) -> tuple[int, ...]:
    meta = method.metadata
    if meta.num_inputs() != 1:
        raise EupeError(f"expected a program with one image input, this one takes {meta.num_inputs()}")
    return tuple(meta.input_tensor_meta(0).sizes())


def execute(method: Any, x: torch.Tensor) -> list[torch.Tensor]:
    return list(method.execute([x.contiguous()]))


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


def time_runs(method: Any, x: torch.Tensor, warmup: int, runs: int) -> list[float]:
    """Wall time of ``method.execute`` in ms: ``warmup`` untimed runs, then ``runs`` timed ones."""
    inputs = [x.contiguous()]
    for _ in range(warmup):
        method.execute(inputs)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        method.execute(inputs)
        times.append((time.perf_counter() - t) * 1e3)
    return times
