"""Where a run executes: device, precision, torchrun/DDP process group, LR schedule."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from eupe.config import Config
from eupe.errors import EupeError
from eupe.hardware import CpuBf16, cpu_bf16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # bf16 autocast (GPUs that have it, CPUs with native bf16); None = fp32
    hardware: dict = field(default_factory=dict)  # what decided the precision (result.json's metrics.hardware)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def mean(self, value: float) -> float:
        """Average a scalar over ranks (the logged loss is the global-batch loss)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.world_size

    def agree(self, value: int, what: str) -> None:
        """Fail on every rank at once when ranks see different values (e.g. checkpoints not shared)."""
        if self.world_size == 1:
            return
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t[0].item() != -t[1].item():
            raise EupeError(f"ranks disagree on {what} ({-t[1].item()}..{t[0].item()}): every rank must see the same --out")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def pick_device(cfg: Config) -> torch.device:
    """``device: auto`` takes this process's GPU (``LOCAL_RANK`` under torchrun) when there is one."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EupeError("config field 'device': cuda, but no CUDA device is visible")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")


def setup(cfg: Config) -> Runtime:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(cfg)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    rank = 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", **_attempt_store())
        rank = dist.get_rank()
        if not use_cuda:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    bf16, hardware = decide_precision(cfg.precision, device)
    if rank == 0:
        log.info("precision: %s", hardware["reason"])
    return Runtime(device=device, rank=rank, world_size=world, amp_dtype=torch.bfloat16 if bf16 else None,
                   hardware=hardware)


def decide_precision(precision: str, device: torch.device, cpu: CpuBf16 | None = None) -> tuple[bool, dict]:
    """Whether to run bf16 autocast, and the record of why. ``precision: auto``: bf16 on a GPU that supports it,
    and on a CPU with native bf16 (AVX512-BF16 or AMX, :mod:`eupe.hardware`); fp32 elsewhere (emulated bf16
    is slower than fp32). ``bf16`` / ``fp32``: as asked, wherever it runs."""
    cpu = cpu or cpu_bf16()
    hw: dict = {"device": str(device), "cpu": cpu.model, "native_bf16": cpu.native_bf16, "evidence": cpu.evidence,
                "cpu_capability": cpu.capability, "config_precision": precision}
    if device.type == "cuda":
        try:
            hw["gpu"] = torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError, AttributeError):
            hw["gpu"] = None
        gpu_bf16 = torch.cuda.is_bf16_supported()
        bf16 = precision == "bf16" or (precision == "auto" and gpu_bf16)
        why = f"GPU {'supports' if gpu_bf16 else 'lacks'} bf16"
    else:
        bf16 = precision == "bf16" or (precision == "auto" and cpu.native_bf16)
        why = f"CPU has native bf16: {cpu.features[0]}" if cpu.native_bf16 else \
            f"CPU has no native bf16: {cpu.evidence}"
    if precision != "auto":
        why = f"precision: {precision}; {why}"
    hw["precision"] = "bf16" if bf16 else "fp32"
    hw["reason"] = f"{'bf16 autocast' if bf16 else 'fp32'} ({why})"
    return bf16, hw


def _attempt_store() -> dict:
    """Under torchrun, a store of this restart attempt's own (``init_process_group`` arguments).

    torchrun restarts the whole worker group when a worker dies (``--max-restarts``); the new workers meet in
    the agent's store, which still holds the addresses the dead group published, and gloo connects to those
    (connection refused). A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps each group's keys apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    import datetime

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(minutes=30))
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return {"store": dist.PrefixStore(f"eupe/attempt_{attempt}", store), "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"])}


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def warmup_cosine(total: int, warmup: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
