"""What a stage distils from: stage 1 the teachers, stages 2 and 3 the stage-1 proxy (frozen)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eupe.config import Config, ModelSpec
from eupe.models.features import Features, extract_features
from eupe.models.registry import build_model, check_model_name, check_weights, freeze, input_norm


@dataclass
class Target:
    name: str
    model: nn.Module
    resolutions: list[int]
    loss_weight: float
    mean: torch.Tensor  # [1, 3, 1, 1] input normalization of the target's family
    std: torch.Tensor


def student_spec(cfg: Config, stage: int) -> tuple[str, ModelSpec]:
    return ("proxy", cfg.proxy) if stage == 1 else ("student", cfg.student)


def target_specs(cfg: Config, stage: int) -> list[tuple[str, str, ModelSpec, float]]:
    """(name, config field, spec, loss weight) for each target of ``stage``."""
    if stage == 1:
        return [(t.name, f"teachers.{i}", t, t.loss_weight) for i, t in enumerate(cfg.teachers)]
    return [("proxy", "proxy", cfg.proxy, 1.0)]


def check_models(cfg: Config, stage: int) -> None:
    """Every model name of the recipe (a typo in the student fails stage 1, not days later) and every
    weights file the stage loads, before anything is built or written."""
    named = [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)] + [("proxy", cfg.proxy), ("student", cfg.student)]
    for where, s in named:
        check_model_name(s.model, f"{where}.model")
    field, spec = student_spec(cfg, stage)
    for _, where, s, _ in target_specs(cfg, stage) + [(field, field, spec, 1.0)]:
        check_weights(s.weights, f"{where}.weights")


def model_inputs(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = input_norm(model)
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def build_targets(cfg: Config, stage: int, device: torch.device) -> list[Target]:
    st = cfg.stage(stage)
    out = []
    for i, (name, where, spec, weight) in enumerate(target_specs(cfg, stage)):
        # Seeded per target: a randomly initialised target (tests, the demo) is the same network
        # in `eupe normalize`, in `eupe train` and on every rank.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1000 + stage * 100 + i)
            model = freeze(build_model(spec, where)).to(device)
        mean, std = model_inputs(model, device)
        out.append(Target(name, model, list(st.teacher_resolutions or [spec.img_size]), weight, mean, std))
    return out


def prepare(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> float, resized to ``size`` (antialiased), normalized for the model."""
    x = images.to(mean.device, non_blocking=True).float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - mean) / std


def target_features(target: Target, images: torch.Tensor, size: int) -> Features:
    """One batched forward of a frozen target; outputs are ordinary tensors usable as loss targets."""
    with torch.inference_mode():
        f = extract_features(target.model, prepare(images, size, target.mean, target.std))
    return Features(f.cls.clone(), f.patches.clone(), f.grid)
