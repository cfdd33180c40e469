"""One training loop for the three EUPE stages. Read it top to bottom:

    stage 1: teachers (several, heterogeneous) -> proxy
    stage 2: proxy -> student at a fixed resolution
    stage 3: proxy -> student, teacher and student each draw a resolution from the pyramid every step

Every step: frozen targets run once per micro-batch under inference mode, their features are
normalized with the frozen stage statistics, the student's tokens go through one adapter per target,
and the EUPE loss is averaged over micro-batches (gradient accumulation to the global batch).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from eupe.progress import progress

from eupe import metrics, results, storage
from eupe.config import Config, LossConfig, StageConfig
from eupe.data.sources import ImageStream, open_data, stream_loader
from eupe.data.loader import StepBatchSampler, sample_seed, step_loader
from eupe.distill import checkpoint
from eupe.distill.loss import distill_loss
from eupe.distill.mirror import CheckpointMirror
from eupe.distill.normalize import FeatureStats, check_bound, load_stats
from eupe.distill.runtime import Runtime, setup, teardown, warmup_cosine
from eupe.distill.targets import (Target, build_targets, check_init, check_models, check_proxy, model_inputs,
                                  prepare_for, student_spec, target_features, target_specs)
from eupe.distill import resume as resume_check
from eupe.distill.parallel import full_state, load_optimizer, no_sync, parallelize, save_optimizer
from eupe.distill.preempt import Preemption
from eupe.distill.resume import Counters, first_line, load_init
from eupe.errors import EupeError, Preempted
from eupe.fingerprint import data_inputs, fingerprint
from eupe.step import StepRun, release_claim
from eupe.models.adapter import TargetAdapter
from eupe.models.features import extract_features, feature_dims
from eupe.models.registry import build_model

log = logging.getLogger(__name__)


class DistillModel(nn.Module):
    """The trained encoder plus one adapter per target. Checkpoint keys: ``encoder.*``, ``adapters.*``."""

    def __init__(self, encoder: nn.Module, adapters: dict[str, TargetAdapter]):
        super().__init__()
        self.encoder = encoder
        self.adapters = nn.ModuleDict(adapters)

    def forward(self, x: torch.Tensor, grids: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        feats = extract_features(self.encoder, x)
        return {name: adapter(feats, grids[name]) for name, adapter in self.adapters.items()}


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    per_target: dict[str, list[float]] = field(default_factory=dict)
    resolutions: list[dict[str, int]] = field(default_factory=list)  # what each step drew
    lr: list[float] = field(default_factory=list)  # the learning rate each step used
    grad_norm: list[float] = field(default_factory=list)  # global gradient norm before clipping


def draw_resolutions(cfg: Config, stage: int, step: int, targets: list[Target]) -> dict[str, int]:
    """Student and each target draw their input size independently, seeded by (seed, stage, step)."""
    rng = random.Random(sample_seed(cfg.seed * 7 + stage, step))
    drawn = {"student": rng.choice(cfg.stage(stage).resolutions)}
    for t in targets:
        drawn[t.name] = rng.choice(t.resolutions)
    return drawn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and other 1-D parameters (standard ViT practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_distill_model(cfg: Config, stage: int, stats: dict[str, FeatureStats], targets: list[Target]) -> DistillModel:
    """The stage's encoder with one adapter per target, sized from the target's frozen statistics."""
    st = cfg.stage(stage)
    field_name, spec = student_spec(cfg, stage)
    encoder = build_model(spec, field_name)
    s_dims = feature_dims(encoder, min(st.resolutions))
    return DistillModel(encoder, {t.name: TargetAdapter(s_dims, stats[t.name].dims, st.adapter_hidden) for t in targets})


def build_optimizer(model: nn.Module, st: StageConfig):
    """AdamW (fused kernel: one op per group instead of several per tensor), cosine with warm-up."""
    opt = torch.optim.AdamW(param_groups(model, st.weight_decay), lr=st.lr, betas=st.betas, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(st.iters, st.warmup_iters, st.min_lr_ratio))


def target_batch(targets: list[Target], stats: dict[str, FeatureStats], images: torch.Tensor,
                 sizes: dict[str, int]) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each frozen target once on the micro-batch at its drawn size: token grids and normalized features."""
    feats = {t.name: target_features(t, images, sizes[t.name]) for t in targets}
    normed = {name: stats[name].apply(f.cls, f.patches) for name, f in feats.items()}
    return {name: f.grid for name, f in feats.items()}, normed


def student_loss(model: nn.Module, x: torch.Tensor, grids: dict[str, tuple[int, int]],
                 normed: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: list[Target],
                 loss_cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student forward through every adapter; the weighted EUPE loss and its value per target."""
    preds = model(x, grids)
    parts = {t.name: distill_loss(*preds[t.name], *normed[t.name], loss_cfg) for t in targets}
    return sum(t.loss_weight * parts[t.name] for t in targets), parts


def micro_step(ddp: nn.Module, targets: list[Target], stats: dict[str, FeatureStats], images: torch.Tensor,
               sizes: dict[str, int], student_norm: tuple[torch.Tensor, torch.Tensor], loss_cfg: LossConfig,
               rt: Runtime, accum: int, sync: bool) -> tuple[float, dict[str, float]]:
    """One micro-batch: frozen targets, student forward and backward of the loss scaled by ``1/accum``
    (gradients add up to the global-batch mean). ``sync=False`` keeps DDP from all-reducing yet."""
    with rt.autocast():
        grids, normed = target_batch(targets, stats, images, sizes)
    x = prepare_for(getattr(ddp, "module", ddp).encoder, images, sizes["student"], *student_norm)
    with no_sync(ddp, sync), rt.autocast():
        loss, parts = student_loss(ddp, x, grids, normed, targets, loss_cfg)
        loss = loss / accum
    loss.backward()
    return loss.item(), {name: v.item() / accum for name, v in parts.items()}


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, sched, grad_clip: float | None) -> tuple[float, float]:
    """Clip the accumulated gradients to a global norm of ``grad_clip``, step the optimizer and the LR
    schedule once, clear the gradients. Returns the learning rate this step used and the norm before clipping."""
    lr = opt.param_groups[0]["lr"]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip is not None else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor over the shards
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return lr, float(norm)


def accumulation(st: StageConfig, stage: int, world_size: int = 1) -> int:
    """Micro-batches per rank and step that reach the global batch; one line when it does not split."""
    per_rank = st.batch_size // world_size
    if per_rank * world_size != st.batch_size or per_rank % st.micro_batch_size:
        raise EupeError(f"stage{stage}.batch_size {st.batch_size} does not split into {world_size} rank(s) "
                        f"x micro batches of {st.micro_batch_size}")
    return per_rank // st.micro_batch_size


def preflight(cfg: Config, stage: int, norm: str, init: str | None, random_proxy: bool = False,
              from_scratch: bool = False) -> tuple[dict[str, FeatureStats], dict]:
    """Every input named by the run exists and fits, before any model is built or any file written.
    Returns the frozen statistics (checked: one entry per target, computed for this stage) and their metadata."""
    check_models(cfg, stage)
    check_proxy(cfg, stage, random_proxy)
    check_init(stage, init, from_scratch)
    accumulation(cfg.stage(stage), stage)
    if not storage.exists(norm):
        raise EupeError(f"--norm: normalization stats not found: {norm}")
    if init is not None and not storage.exists(init):
        raise EupeError(f"--init: checkpoint not found: {init}")
    stats, meta = load_stats(norm)
    missing = [name for name, *_ in target_specs(cfg, stage) if name not in stats]
    if missing:
        raise EupeError(f"--norm {norm} has no statistics for {missing} (has {sorted(stats)})")
    if meta.get("stage", stage) != stage:
        raise EupeError(f"--norm {norm} was computed for stage {meta['stage']}, not stage {stage}")
    return stats, meta


def train(cfg: Config, stage: int, out: str | Path, norm: str, init: str | None = None,
          resume: bool | str = False, random_proxy: bool = False, from_scratch: bool = False,
          allow_changes: list[str] | None = None) -> dict:
    """One stage into ``out``. ``resume``: continue from the last checkpoint under ``out`` (refused when it was
    written with other inputs or config); ``"auto"`` (what the pipelines pass): continue when it was written by
    the same inputs and config, else start over (``allow_changes``: config fields that may differ, see
    :mod:`eupe.distill.resume`). Stages 2-3 need proxy weights and stage 3 ``init`` unless ``random_proxy`` /
    ``from_scratch`` say otherwise on purpose. SIGTERM: a checkpoint at the end of the step, then
    :class:`eupe.errors.Preempted` (exit 143)."""
    stats, meta = preflight(cfg, stage, norm, init, random_proxy, from_scratch)
    source = open_data(cfg.data, cfg.seed, cfg.validation.max_pixels)  # data.sources mixed by weight, or data.root
    fp = run_fingerprint(cfg, stage, norm, init)
    rt = setup(cfg)
    try:
        with Preemption() as preemption:
            run_inputs = RunInputs(norm, stats, meta, init, resume, list(allow_changes or []))
            result = _train(cfg, stage, str(out), run_inputs, source, rt, fp, preemption)
    except EupeError:
        # no teardown: destroying the process group waits on ranks that may be gone already, and torchrun
        # stops the ranks still running as soon as one exits, so the one line comes first, then the exit
        if rt.is_main:
            release_claim(str(out))
        raise
    except BaseException:
        teardown()
        raise
    teardown()
    return result


def run_fingerprint(cfg: Config, stage: int, norm: str, init: str | None) -> dict:
    """What a stage's result depends on: data, statistics, init checkpoint, every model's weights, config, code."""
    field_name, spec = student_spec(cfg, stage)
    weights = {f"{where}.weights": s.weights for _, where, s, _ in target_specs(cfg, stage)}
    inputs = {**data_inputs(cfg.data), **weights, f"{field_name}.weights": spec.weights, "norm": norm, "init": init}
    return fingerprint(f"train-stage{stage}", inputs, cfg)


@dataclass
class RunInputs:
    """What a stage run was given besides the config and the data."""

    norm: str
    stats: dict[str, FeatureStats]
    meta: dict  # the statistics' metadata: what they describe (eupe.distill.normalize.check_bound)
    init: str | None
    resume: bool | str
    allow: list[str]  # config fields a resume may change (--allow-config-change)


def _train(cfg: Config, stage: int, out: str, inputs: RunInputs, source, rt: Runtime, fp: dict,
           preemption: Preemption) -> dict:
    st = cfg.stage(stage)
    norm, stats, meta, init, resume, allow = (inputs.norm, inputs.stats, inputs.meta, inputs.init, inputs.resume,
                                              inputs.allow)
    torch.manual_seed(cfg.seed)
    accum = accumulation(st, stage, rt.world_size)
    run = StepRun(out, f"train-stage{stage}", fp, main=rt.is_main)
    if run.done:
        return run.done if rt.is_main else {}
    mirror = CheckpointMirror(out, rt.rank) if storage.is_s3(out) else None  # s3://: a local folder, mirrored
    work = mirror.work if mirror else Path(out)
    norm_digest = fp["inputs"]["norm"]["digest"]  # recorded in every checkpoint
    config = cfg.model_dump(mode="json")  # recorded too: a resume names each field that differs

    # --- resume: which checkpoint, if any, this run continues (before any model is built) ----------
    ckpt_dir = work / "checkpoints"
    if mirror is not None and resume:
        mirror.restore(ckpt_dir)
    last = checkpoint.latest(ckpt_dir) if resume else None
    if resume and last is None:
        log.info("--resume: no complete checkpoint under %s yet, starting from step 0", ckpt_dir)
    state = checkpoint.load(last) if last is not None else None
    if state is not None:
        why = resume_check.mismatch(state[1], fp, config, norm, allow)
        if why and resume != "auto":
            raise EupeError(f"--resume: {last} {why} (--allow-config-change FIELD for a change you mean; or train into "
                            "another --out, or pass --resume auto to start over)")
        if why:
            log.info("--resume auto: %s %s: starting from step 0 (its checkpoints are replaced at this run's "
                     "first save)", last, why)
            last = state = None
    fresh = last is None  # an older run's checkpoints stay until this run has saved its first one

    # --- models: frozen targets, their frozen statistics, the student and its adapters -------------
    targets = build_targets(cfg, stage, rt.device)
    check_bound(targets, stats, meta, norm)
    model = build_distill_model(cfg, stage, stats, targets)
    if init is not None:  # stage 3 continues the stage-2 encoder and adapters
        load_init(model, init)
    if state is not None:  # whole weights into the whole model, before it is sharded
        try:
            model.load_state_dict(state[0])
        except (RuntimeError, ValueError, KeyError) as e:
            raise EupeError(f"--resume: {last} does not fit this model: {first_line(e)}") from None
    model.to(rt.device).train()
    student_norm = model_inputs(model.encoder, rt.device)  # the student's input mean/std
    ddp = parallelize(model, targets, cfg, rt)  # DDP, FSDP2 shards, activation checkpointing, compile
    opt, sched = build_optimizer(model, st)
    history, start, counters = History(), 0, Counters()
    if state is not None:
        state = state[1]
        try:
            load_optimizer(model, opt, state, last)
        except (RuntimeError, ValueError, KeyError) as e:
            raise EupeError(f"--resume: {last}'s optimizer state does not fit this model: {first_line(e)}") from None
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        history = History(**state["history"])
        counters = Counters(**state.get("counters", {}))
        start = state["step"]
        log.info("resumed from %s at step %d", last, start)
    rt.agree(start, "the step to resume from")

    load_size = max([*st.resolutions, *(r for t in targets for r in t.resolutions)])
    if isinstance(source, ImageStream):  # .tar shards: streamed; a resume skips the micro-batches already seen
        batches = iter(stream_loader(source, load_size, st.micro_batch_size, cfg.data.num_workers, cfg.data.crop_scale,
                                     cfg.data.hflip, start_batch=start * accum, rank=rt.rank, world_size=rt.world_size,
                                     pin_memory=rt.device.type == "cuda"))
    else:
        sampler = StepBatchSampler(len(source), st.batch_size, st.micro_batch_size, start, st.iters, cfg.seed, rt.rank, rt.world_size)
        batches = iter(step_loader(source, load_size, sampler, cfg.data.num_workers, cfg.data.crop_scale, cfg.data.hflip,
                                   pin_memory=rt.device.type == "cuda"))

    # --- the loop --------------------------------------------------------------------------------
    run.claim()  # every check passed: --out is this step's before any rank writes (FSDP shards bypass storage)
    bar = progress(total=st.iters, initial=start, desc=f"stage{stage}", unit="step", disable=not rt.is_main)
    t0, seen, last_ckpt, skipped = time.perf_counter(), 0, last, 0
    live = metrics.serve_training(stage, st.iters, st.batch_size, main=rt.is_main)  # /metrics with EUPE_METRICS_PORT

    def scheduled(n: int) -> bool:  # the checkpoint schedule: every checkpoint_every steps and the last
        return n % st.checkpoint_every == 0 or n == st.iters

    for step in range(start, st.iters):
        sizes = draw_resolutions(cfg, stage, step, targets)
        step_loss, step_parts = 0.0, {t.name: 0.0 for t in targets}
        for micro in range(accum):
            images, _, bad = next(batches)
            skipped += int(bad.sum())  # undecodable files replaced in this micro-batch
            loss, parts = micro_step(ddp, targets, stats, images, sizes, student_norm, cfg.loss, rt, accum,
                                     sync=micro == accum - 1 or rt.world_size == 1)
            step_loss += loss
            for name, v in parts.items():
                step_parts[name] += v
        lr, grad_norm = optimizer_step(model, opt, sched, st.grad_clip)

        history.loss.append(rt.mean(step_loss))
        for name, v in step_parts.items():
            history.per_target.setdefault(name, []).append(rt.mean(v))
        history.resolutions.append(sizes)
        history.lr.append(lr)
        history.grad_norm.append(grad_norm)
        seen += st.batch_size
        rate = seen / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{history.loss[-1]:.4f}", img_s=f"{rate:.1f}")
        live.update(step + 1, history.loss[-1], rate, lr)
        if (step + 1) % st.log_every == 0 and rt.is_main:
            eta = (st.iters - step - 1) * st.batch_size / max(rate, 1e-9)
            log.info("stage%d step %d/%d loss %.4f %.1f img/s eta %.0fs", stage, step + 1, st.iters, history.loss[-1], rate, eta)
        stop = rt.mean(float(preemption.requested)) > 0  # every rank stops at the same step
        if scheduled(step + 1) or stop:
            total = Counters(counters.images + seen, counters.skipped + round(rt.mean(float(skipped)) * rt.world_size),
                             counters.train_s + time.perf_counter() - t0)  # every rank joins the reduction
            weights = full_state(model)  # every rank: FSDP gathers the shards to rank 0
            staging = checkpoint.optim_staging(ckpt_dir, step + 1)
            optim = save_optimizer(model, opt, staging)  # FSDP: every rank writes its shard
            if rt.is_main:
                last_ckpt = checkpoint.save(ckpt_dir, step + 1, weights, {
                    "optimizer": optim, "scheduler": sched.state_dict(), "rng": checkpoint.rng_state(),
                    "history": history.__dict__, "fingerprint": fp, "norm": norm_digest, "config": config,
                    "counters": total.as_dict(),
                }, first=fresh, regular=scheduled)
                if mirror is not None:
                    mirror.upload(last_ckpt)
            if optim is None and mirror is not None:  # FSDP into s3://: each rank's shard is in its own folder
                rt.barrier()  # after rank 0's upload, which clears what an earlier upload of this step left
                if not rt.is_main:
                    mirror.push_shards(staging, step + 1)
                rt.barrier()  # every shard in the bucket before latest.json names the checkpoint
            if rt.is_main and mirror is not None:
                mirror.publish(last_ckpt, keep={p.name for p in ckpt_dir.glob("step_*")})
            fresh = False
            rt.barrier()
        if stop and step + 1 < st.iters:
            raise Preempted(f"SIGTERM at stage{stage} step {step + 1}/{st.iters}: checkpoint {ckpt_dir}/step_{step + 1:08d} "
                            "saved; run again with --resume to continue")
    bar.close()
    live.close()
    wall = time.perf_counter() - t0

    total = Counters(counters.images + seen, counters.skipped + round(rt.mean(float(skipped)) * rt.world_size),
                     counters.train_s + wall)  # the whole run, over every resume; every rank joins the reduction
    weights = full_state(model)  # every rank joins an FSDP gather
    if not rt.is_main:
        return {}
    # A run killed between its last save and that save's pruning resumes at the end and saves nothing: the
    # preemption checkpoint an earlier run left off the schedule goes here, as the save would have removed it.
    checkpoint.prune(ckpt_dir, checkpoint.KEEP, regular=scheduled)
    last_ckpt = last_ckpt or checkpoint.latest(ckpt_dir)
    if mirror is not None and last_ckpt is not None:
        last_ckpt = mirror.uri(last_ckpt)  # the artifact is the bucket's copy
    return results.write_training_result(run, stage, history.__dict__, {
        "steps": st.iters, "steps_this_run": st.iters - start, "images": total.images,
        "images_per_s": total.images / total.train_s if total.train_s > 0 else 0.0, "train_s": total.train_s,
        "wall_s": wall, "skipped_images": total.skipped, "world_size": rt.world_size, "global_batch": st.batch_size,
        "accumulation": accum, "hardware": rt.hardware,
    }, checkpoint_dir=last_ckpt, encoder_state={k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")},
        spec=student_spec(cfg, stage)[1], lineage={"config": cfg.name, "config_sha256": fp.get("config"),
                                                    "code": fp.get("code"), "norm": norm_digest,
                                                    "inputs": {k: v["uri"] for k, v in fp["inputs"].items()}})
