"""A stage's models as training builds them, without weights and, for the plan, without memory.

``weightless(cfg)`` is the recipe with every ``weights:`` removed (nothing is downloaded or read). For the plan
(``fake=True``) every timm model is built on the meta device and then given fake CPU tensors of the same shapes
and dtypes under one ``FakeTensorMode``: nothing is allocated, yet every operator of the step runs and knows
the size of what it returns. For the real run the plan is checked against (``fake=False``) the same models are
built on the CPU, randomly initialised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from eupe.config import Config
from eupe.distill.normalize import FeatureStats
from eupe.distill.targets import Target, model_inputs, target_resolutions, target_specs
from eupe.distill.trainer import DistillModel, build_distill_model
from eupe.models.features import feature_dims
from eupe.models.registry import build_model, freeze


def weightless(cfg: Config) -> Config:
    """The recipe with every ``weights:`` left out: the plan needs shapes, never the weights."""
    return cfg.model_copy(update={
        "teachers": [t.model_copy(update={"weights": None}) for t in cfg.teachers],
        "proxy": cfg.proxy.model_copy(update={"weights": None}),
        "student": cfg.student.model_copy(update={"weights": None}),
    })


def materialize(module: nn.Module, device: torch.device) -> nn.Module:
    """Meta parameters and buffers replaced by empty tensors on ``device`` (fake ones under ``FakeTensorMode``),
    same shapes, dtypes and ``requires_grad``; a parameter shared by two modules stays shared."""
    done: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for key, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                               requires_grad=p.requires_grad)
                m._parameters[key] = done[id(p)]
        for key, b in list(m._buffers.items()):
            if b is not None:
                if id(b) not in done:
                    done[id(b)] = torch.empty(b.shape, dtype=b.dtype, device=device)
                m._buffers[key] = done[id(b)]
    return module


@dataclass
class StageModels:
    """What one training step of a stage touches: frozen targets, their statistics, the trained model."""

    targets: list[Target]
    stats: dict[str, FeatureStats]
    model: DistillModel
    student_norm: tuple[torch.Tensor, torch.Tensor]

    def constants(self) -> list[torch.Tensor]:
        """Small tensors the step reads besides the models: statistics, input mean/std."""
        out = [*self.student_norm]
        for t in self.targets:
            out += [t.mean, t.std]
        for s in self.stats.values():
            out += [s.cls_mean, s.cls_std, s.patch_mean, s.patch_std]
        return out


def _stats(dims: tuple[int, int], device: torch.device) -> FeatureStats:
    c, p = dims
    return FeatureStats(torch.zeros(c, device=device), torch.ones(c, device=device),
                        torch.zeros(p, device=device), torch.ones(p, device=device))


def build_stage(cfg: Config, stage: int, fake_mode=None, device: torch.device = torch.device("cpu")) -> StageModels:
    """Targets (frozen), statistics of the right widths and the trained model with its adapters, for one step of
    ``stage``. With ``fake_mode`` (a ``FakeTensorMode``) every tensor is fake; without, real and random."""
    cfg = weightless(cfg)
    fake = fake_mode is not None
    with torch.device("meta") if fake else contextlib.nullcontext():
        models = []
        for i, (name, where, spec, weight) in enumerate(target_specs(cfg, stage)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed * 1000 + stage * 100 + i)  # as build_targets
                models.append((name, freeze(build_model(spec, where)), target_resolutions(cfg, stage, spec), weight))
        dims = {name: feature_dims(m, min(res)) for name, m, res, _ in models}
        shells = [Target(name, m, res, w, torch.zeros(1), torch.ones(1)) for name, m, res, w in models]
        model = build_distill_model(cfg, stage, {n: _stats(d, torch.device("cpu" if not fake else "meta"))
                                                 for n, d in dims.items()}, shells)
    with fake_mode if fake else contextlib.nullcontext():
        targets = []
        for name, m, res, w in models:
            m = materialize(m, device) if fake else m.to(device)
            targets.append(Target(name, m, res, w, *model_inputs(m, device)))
        stats = {n: _stats(d, device) for n, d in dims.items()}
        model = materialize(model, device) if fake else model.to(device)
        model.train()
        student_norm = model_inputs(model.encoder, device)
    return StageModels(targets, stats, model, student_norm)
