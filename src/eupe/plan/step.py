"""One training step of a stage, measured: the trainer's own functions on the stage's real models.

The step is the trainer's (``eupe.distill.trainer``): every frozen target once on the micro-batch under inference
mode (``target_batch``), the student through its adapters and the loss (``student_loss``), backward, gradient
clipping and the AdamW step (``build_optimizer``), with the models spread over the ranks by
``eupe.distill.parallel.parallelize`` (DDP, or FSDP2 per block, activation checkpointing), gradient accumulation
with ``no_sync``. Differences, each on purpose: the micro-step's ``loss.item()`` and the clip's ``float(norm)``
are left out (a fake tensor has no value); the optimizer state is created by one step on zero gradients before
the measured step, so that the measured step is a steady-state one (moments allocated; with accumulation, the
gradients of earlier micro-batches present: with FSDP one un-synchronised micro-batch runs first, as it does in
training); every size is the largest the stage draws.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from eupe.config import Config
from eupe.distill.runtime import Runtime
from eupe.distill.targets import prepare_for
from eupe.distill.trainer import build_optimizer, student_loss, target_batch
from eupe.plan.autocast import CudaAutocastLists, backward, gpu_autocast
from eupe.plan.build import build_stage
from eupe.plan.tracker import StepTracker


@dataclass(frozen=True)
class Option:
    """How a stage is spread and recomputed: ``ddp`` (every rank holds everything) or ``fsdp`` (sharded per
    block), with or without activation checkpointing."""

    strategy: str  # ddp | fsdp
    checkpointing: bool

    @property
    def label(self) -> str:
        return f"{self.strategy}{'+ac' if self.checkpointing else ''}"


OPTIONS = (Option("ddp", False), Option("ddp", True), Option("fsdp", False), Option("fsdp", True))


@dataclass(frozen=True)
class PlanRuntime(Runtime):
    """The runtime of a GPU rank, on CPU tensors: ``autocast()`` is CUDA's bf16 autocast (see plan.autocast)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return gpu_autocast(self.amp_dtype)


@dataclass
class Measurement:
    stage: int
    option: str
    micro_batch: int
    world_size: int
    peak: int  # bytes on one GPU at the step's peak
    parts: dict[str, int] = field(default_factory=dict)  # the peak by category (plan.tracker.CATEGORIES)
    phase: str = ""  # where in the step the peak was
    seconds: float = 0.0  # how long measuring took


def stage_sizes(cfg: Config, stage: int, targets) -> dict[str, int]:
    """The largest size the student and each target draw (stage 3: the top of the pyramid)."""
    return {"student": max(cfg.stage(stage).resolutions), **{t.name: max(t.resolutions) for t in targets}}


def variant(cfg: Config, option: Option, compile: bool = False) -> Config:
    """The recipe with ``distributed`` set to ``option`` (the plan runs eagerly: no compile)."""
    d = cfg.distributed.model_copy(update={"strategy": option.strategy, "compile": compile,
                                           "activation_checkpointing": option.checkpointing})
    return cfg.model_copy(update={"distributed": d})


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of ``world_size`` ranks (this process is rank 0; collectives do nothing)."""
    if world_size == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("eupe plan needs its own process group: a process group is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def default_mesh(world_size: int):
    """FSDP2's default device mesh built before the fake tensors' mode is active: ``fully_shard`` without a mesh
    builds one itself and a mesh cannot be built under ``FakeTensorMode`` (it reads its rank tensor). As in
    torchtitan's estimator, the mesh is made outside; here it is handed to the ``fully_shard`` calls of
    ``parallelize`` in place of the one they would build."""
    if world_size == 1:
        yield
        return
    from unittest import mock

    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():
        mesh = init_device_mesh("cpu", (world_size,))
    with mock.patch("torch.distributed.fsdp._fully_shard._fully_shard._init_default_mesh", lambda *a, **k: mesh):
        yield


def amp_dtype(cfg: Config) -> torch.dtype | None:
    """The step's autocast dtype on a GPU: ``precision: auto`` and ``bf16`` are bf16 (as on every GPU the plan
    is for), ``fp32`` none."""
    return None if cfg.precision == "fp32" else torch.bfloat16


def accumulation_steps(cfg: Config, stage: int, micro_batch: int, world_size: int) -> int:
    return max(1, cfg.stage(stage).batch_size // world_size // micro_batch)


def ddp_buckets(model: torch.nn.Module) -> list[torch.Tensor]:
    """The flat gradient buffers ``DistributedDataParallel`` allocates at construction (its Reducer's buckets:
    every trained parameter's gradient, in its dtype). With ``gradient_as_bucket_view=True`` the gradients are
    views into them and this is no extra memory; ``parallelize`` builds DDP without it."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return [torch.empty(n, dtype=dtype, device=next(model.parameters()).device) for dtype, n in sizes.items()]


def run_step(cfg: Config, stage: int, option: Option, micro_batch: int, world_size: int, fake: bool = True,
             on_ready=None, device: torch.device | None = None, compile: bool = False) -> Measurement:
    """Build the stage's models, spread them as ``option`` says over ``world_size`` ranks (a fake process group,
    this process is rank 0), and run one steady-state training step under :class:`StepTracker` (``fake``: on
    fake CPU tensors). ``on_ready(step, models, optimizer)``, when given, is called instead of running the step
    under the tracker (the real-memory check and the GPU benchmark run it under their own measures; with a CUDA
    ``device`` the step runs on it under CUDA's own autocast, ``compile`` as ``distributed.compile``)."""
    from eupe.distill.parallel import no_sync, parallelize

    t0 = time.perf_counter()
    cfg = variant(cfg, option, compile)
    st = cfg.stage(stage)
    fake_mode = None
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
    device = device or torch.device("cpu")
    emulate = device.type == "cpu" and amp_dtype(cfg) is not None  # CUDA's autocast lists on CPU tensors
    rt = (PlanRuntime if device.type == "cpu" else Runtime)(device=device, rank=0, world_size=world_size,
                                                            amp_dtype=amp_dtype(cfg))
    with torch.device(device) if not fake else contextlib.nullcontext():  # built where it runs
        m = build_stage(cfg, stage, fake_mode, device)
    accum = accumulation_steps(cfg, stage, micro_batch, world_size)
    ddp = option.strategy == "ddp" and world_size > 1
    with fake_mode if fake else contextlib.nullcontext():
        # DDP cannot wrap fake tensors (it reads them to check the ranks agree): the model runs as one rank of DDP
        # sees it, and DDP's gradient buckets (one flat buffer as large as all gradients, beside them unless
        # gradient_as_bucket_view) are allocated as DDP allocates them.
        with default_mesh(world_size if option.strategy == "fsdp" else 1):
            wrapped = parallelize(m.model, m.targets, cfg, replace(rt, world_size=1) if ddp else rt)
        buckets = ddp_buckets(m.model) if ddp else []
        opt, sched = build_optimizer(m.model, st)
        params = [p for p in m.model.parameters() if p.requires_grad]
        for p in params:  # AdamW's moments exist from the first step on
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=accum == 1)  # with accumulation earlier micro-batches' gradients are there
        sizes = stage_sizes(cfg, stage, m.targets)
        load = max(sizes.values())
        micros = 2 if accum > 1 and option.strategy == "fsdp" and world_size > 1 else 1
        tracker = StepTracker() if on_ready is None else None

        def phase(name: str) -> None:
            if tracker is not None:
                tracker.phase = name

        def step() -> None:
            with CudaAutocastLists() if emulate else contextlib.nullcontext():
                _step()

        def _step() -> None:
            for i in range(micros):
                label = f"micro-batch {i + 1}/{micros}" if micros > 1 else "micro-batch"
                new = torch.empty if fake else torch.zeros
                images = new(micro_batch, 3, load, load, dtype=torch.uint8, device=device)
                phase(f"targets, {label}")
                with rt.autocast():
                    grids, normed = target_batch(m.targets, m.stats, images, sizes)
                phase(f"forward, {label}")
                x = prepare_for(m.model.encoder, images, sizes["student"], *m.student_norm)
                with no_sync(wrapped, i == micros - 1), rt.autocast():
                    loss, _ = student_loss(wrapped, x, grids, normed, m.targets, cfg.loss)
                    loss = loss / accum
                phase(f"backward, {label}")
                backward(loss)
                del loss, x, grids, normed, images
                if tracker is not None:
                    tracker.reset_mod_stats()  # the tracker refuses a second top-level call otherwise
            phase("optimizer step")
            torch.nn.utils.clip_grad_norm_(params, st.grad_clip if st.grad_clip is not None else float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        if on_ready is not None:
            on_ready(step, m, opt)
            return Measurement(stage, option.label, micro_batch, world_size, 0, seconds=time.perf_counter() - t0)
        tracker.track_external(m.model, opt)
        tracker.track_gradients(*buckets)
        tracker.track_frozen(*(p for t in m.targets for p in t.model.parameters()))
        tracker.track_buffers(*m.constants(), *(b for t in m.targets for b in t.model.buffers()))
        with tracker:
            step()
        peak, parts = tracker.peak()
    return Measurement(stage, option.label, micro_batch, world_size, peak, parts, tracker.peak_phase,
                       time.perf_counter() - t0)
