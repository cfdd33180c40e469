"""Known answers for the trainer's step functions: the LR schedule, clipping, the optimizer's groups,
accumulation, and the weighted loss of a micro-batch against independently normalized targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eupe.config import LossConfig, StageConfig, load_config
from eupe.distill.normalize import FeatureStats
from eupe.distill.runtime import Runtime, warmup_cosine
from eupe.distill.targets import build_targets, prepare
from eupe.distill.trainer import (accumulation, build_distill_model, build_optimizer, micro_step, optimizer_step,
                                  param_groups, student_loss, target_batch)
from eupe.errors import EupeError
from eupe.models.features import extract_features, feature_dims
import reference

# --- learning rate: linear warm-up then cosine to min_lr_ratio ---------------------------------------


def test_warmup_cosine_at_known_steps():
    f = warmup_cosine(total=10, warmup=2, min_ratio=0.1)
    assert f(0) == pytest.approx(0.5)  # warm-up: (step + 1) / warmup
    assert f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)  # cosine starts at the peak
    assert f(6) == pytest.approx(0.55)  # midpoint of the cosine: halfway between 1 and min_lr_ratio
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)  # the end, and past it
    for step in range(12):
        assert f(step) == pytest.approx(reference.warmup_cosine(step, 10, 2, 0.1)), step
    g = warmup_cosine(total=4, warmup=0, min_ratio=0.0)
    assert [round(g(s), 6) for s in range(5)] == [1.0, round((1 + math.cos(math.pi / 4)) / 2, 6), 0.5,
                                                  round((1 + math.cos(3 * math.pi / 4)) / 2, 6), 0.0]


def _stage(**kw) -> StageConfig:
    base = dict(iters=10, batch_size=4, micro_batch_size=2, lr=0.01, warmup_iters=3, min_lr_ratio=0.2,
                weight_decay=0.05, betas=(0.8, 0.95), resolutions=[32], adapter_hidden=8)
    return StageConfig(**{**base, **kw})


def test_optimizer_is_adamw_with_the_stage_schedule_and_no_decay_on_1d_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    st = _stage()
    opt, sched = build_optimizer(model, st)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.95)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])] and decay["weight_decay"] == 0.05
    assert sorted(p.ndim for p in no_decay["params"]) == [1, 1, 1] and no_decay["weight_decay"] == 0.0
    lrs = []
    for _ in range(st.iters):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.01 * reference.warmup_cosine(s, 10, 3, 0.2) for s in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert no_decay["lr"] == decay["lr"]  # one schedule for both groups


def test_param_groups_leave_frozen_parameters_out():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.3)
    assert decay["params"] == [model.weight] and no_decay["params"] == []


# --- one optimizer step: clipping, the schedule stepped once, gradients cleared ---------------------


def _sgd_model() -> tuple[nn.Linear, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    model.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    model.bias.grad = torch.tensor([4.0, 0.0])  # global norm 5
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))


def test_optimizer_step_clips_the_global_gradient_norm():
    model, opt, sched = _sgd_model()
    lr, norm = optimizer_step(model, opt, sched, grad_clip=1.0)
    assert (lr, norm) == (1.0, pytest.approx(5.0))
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-0.6, 0.0], [0.0, 0.0]]))  # -g * 1/5
    torch.testing.assert_close(model.bias.detach(), torch.tensor([-0.8, 0.0]))
    assert model.weight.grad is None and model.bias.grad is None
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # the schedule moved one step


def test_optimizer_step_without_clipping_applies_the_raw_gradient():
    model, opt, sched = _sgd_model()
    lr, norm = optimizer_step(model, opt, sched, grad_clip=None)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(model.bias.detach(), torch.tensor([-4.0, 0.0]))


def test_a_norm_below_the_clip_is_left_alone():
    model, opt, sched = _sgd_model()
    optimizer_step(model, opt, sched, grad_clip=10.0)
    torch.testing.assert_close(model.bias.detach(), torch.tensor([-4.0, 0.0]))


# --- accumulation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, micro, world, expected", [(8, 4, 1, 2), (8, 4, 2, 1), (12, 2, 3, 2), (8, 8, 1, 1)])
def test_accumulation_reaches_the_global_batch(batch, micro, world, expected):
    assert accumulation(_stage(batch_size=batch, micro_batch_size=micro), 2, world) == expected


@pytest.mark.parametrize("batch, micro, world", [(8, 3, 1), (9, 3, 2), (8, 8, 2)])
def test_accumulation_refuses_a_batch_that_does_not_split(batch, micro, world):
    with pytest.raises(EupeError, match=f"stage2.batch_size {batch} does not split into {world} rank"):
        accumulation(_stage(batch_size=batch, micro_batch_size=micro), 2, world)


# --- a micro-batch on tiny real models: weighted loss on independently normalized targets ----------

RECIPE = """
seed: 0
device: cpu
precision: fp32
teachers:
  - {name: pecore, model: vit_pe_core_gigantic_patch14_448, img_size: 56, loss_weight: 0.3,
     kwargs: {embed_dim: 24, depth: 1, num_heads: 2}}
  - {name: dinov3, model: vit_huge_plus_patch16_dinov3, img_size: 48, loss_weight: 1.7,
     kwargs: {embed_dim: 16, depth: 1, num_heads: 2}}
proxy: {model: vit_pe_core_gigantic_patch14_448, img_size: 42, kwargs: {embed_dim: 32, depth: 1, num_heads: 2}}
student: {model: vit_t, img_size: 32, kwargs: {embed_dim: 16, depth: 1, num_heads: 2}}
stage1: {iters: 4, batch_size: 4, micro_batch_size: 2, adapter_hidden: 8, resolutions: [42]}
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(RECIPE)
    cfg = load_config(path)
    torch.manual_seed(0)
    targets = build_targets(cfg, 1, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    stats = {}
    for t in targets:  # arbitrary frozen statistics, far from 0 / 1 so that a missing normalization shows
        c, p = feature_dims(t.model, t.resolutions[0])
        stats[t.name] = FeatureStats(torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5,
                                     torch.randn(p, generator=g), torch.rand(p, generator=g) * 2 + 0.2)
    model = build_distill_model(cfg, 1, stats, targets).train()
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    sizes = {"student": 42, "pecore": 56, "dinov3": 48}
    return cfg, targets, stats, model, images, sizes


def _expected_loss(targets, stats, model, images, sizes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Written out: each target's tokens standardized with its frozen stats, the student's tokens through
    its adapters (patches bilinearly resampled onto the target grid), the paper's loss, weighted."""
    s_mean, s_std = model.encoder.pretrained_cfg["mean"], model.encoder.pretrained_cfg["std"]
    x = images.float() / 255
    student = extract_features(model.encoder, (F.interpolate(x, size=(42, 42), mode="bilinear", antialias=True)
                                               - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1))
    total, parts = 0.0, {}
    for t in targets:
        r = sizes[t.name]
        xt = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True)
        with torch.no_grad():
            f = extract_features(t.model, (xt - t.mean) / t.std)
        st = stats[t.name]
        t_cls = reference.standardize(f.cls, st.cls_mean, st.cls_std)
        t_patch = reference.standardize(f.patches, st.patch_mean, st.patch_std)
        adapter = model.adapters[t.name]
        s_cls = reference.adapter_mlp(student.cls, adapter.cls)
        s_patch = reference.adapter_mlp(reference.resample_grid(student.patches, student.grid, f.grid), adapter.patch)
        parts[t.name] = reference.eupe_loss(s_cls, s_patch, t_cls, t_patch)
        total = total + t.loss_weight * parts[t.name]
    return total, parts


def test_target_batch_normalizes_each_target_with_its_frozen_statistics(micro):
    _, targets, stats, _, images, sizes = micro
    grids, normed = target_batch(targets, stats, images, sizes)
    assert grids == {"pecore": (4, 4), "dinov3": (3, 3)}
    for t in targets:
        r = sizes[t.name]
        x = F.interpolate(images.float() / 255, size=(r, r), mode="bilinear", antialias=True)
        f = extract_features(t.model, (x - t.mean) / t.std)
        s = stats[t.name]
        torch.testing.assert_close(normed[t.name][0], reference.standardize(f.cls, s.cls_mean, s.cls_std))
        torch.testing.assert_close(normed[t.name][1], reference.standardize(f.patches, s.patch_mean, s.patch_std))


def test_student_loss_is_the_loss_weighted_sum_over_targets(micro):
    cfg, targets, stats, model, images, sizes = micro
    assert [t.loss_weight for t in targets] == [0.3, 1.7]
    grids, normed = target_batch(targets, stats, images, sizes)
    x = prepare(images, 42, *(torch.tensor(model.encoder.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std")))
    loss, parts = student_loss(model, x, grids, normed, targets, cfg.loss)
    expected, expected_parts = _expected_loss(targets, stats, model, images, sizes)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name in expected_parts:
        torch.testing.assert_close(parts[name], expected_parts[name], rtol=1e-5, atol=1e-6)


def test_micro_step_backpropagates_the_loss_divided_by_the_accumulation(micro):
    cfg, targets, stats, model, images, sizes = micro
    norm = tuple(torch.tensor(model.encoder.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    rt = Runtime(device=torch.device("cpu"))
    expected, expected_parts = _expected_loss(targets, stats, model, images, sizes)
    grads = []
    for accum in (1, 4):
        model.zero_grad(set_to_none=True)
        value, parts = micro_step(model, targets, stats, images, sizes, norm, cfg.loss, rt, accum, sync=True)
        assert value == pytest.approx(expected.item() / accum, rel=1e-5)
        assert parts == pytest.approx({k: v.item() / accum for k, v in expected_parts.items()}, rel=1e-5)
        grads.append(model.encoder.patch_embed.proj.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1] * 4, grads[0], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


# --- input preparation: an antialiased bilinear resize, then the model's normalization ---------------------


@pytest.mark.parametrize("src,size", [(100, 112), (95, 96), (112, 64), (112, 96), (120, 120)])
def test_prepare_resizes_as_the_antialiased_bilinear_resize(src, size):
    """uint8 -> [0, 1] -> antialiased bilinear to the size -> (x - mean) / std, enlarging or shrinking."""
    g = torch.Generator().manual_seed(src + size)
    images = torch.randint(0, 256, (2, 3, src, src), generator=g, dtype=torch.uint8)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    x = images.float() / 255
    if src != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(prepare(images, size, mean, std), (x - mean) / std, rtol=0, atol=1e-5)


def test_prepare_antialiases_a_shrink_along_either_side():
    """Shrinking one side and enlarging the other still antialiases (plain bilinear would alias the shrink)."""
    images = torch.zeros(1, 3, 20, 100, dtype=torch.uint8)
    images[..., ::2] = 255  # a one-pixel stripe pattern across the side that shrinks
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    out = prepare(images, 30, mean, std)
    expected = F.interpolate(images.float() / 255, size=(30, 30), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, expected)
    plain = F.interpolate(images.float() / 255, size=(30, 30), mode="bilinear", antialias=False, align_corners=False)
    assert (out - plain).abs().max() > 0.1
