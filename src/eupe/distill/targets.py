"""What a stage distils from: stage 1 the teachers, stages 2 and 3 the stage-1 proxy (frozen)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eupe.config import Config, ModelSpec
from eupe.errors import EupeError
from eupe.models.features import Features, aligned_size, extract_features, resolve_summary
from eupe.models.registry import build_model, check_model_name, check_weights, freeze, input_norm, weights_digest


@dataclass
class Target:
    name: str
    model: nn.Module
    resolutions: list[int]
    loss_weight: float
    mean: torch.Tensor  # [1, 3, 1, 1] input normalization of the target's family
    std: torch.Tensor
    weights: str = ""  # content digest of the weights as built (eupe.models.registry.weights_digest)

    @property
    def record(self) -> dict:
        """What its normalization statistics describe (kept in norm.safetensors, checked by training)."""
        return {"weights": self.weights, "resolutions": self.resolutions, "summary": resolve_summary(self.model),
                "input_sizes": [aligned_size(self.model, r) for r in self.resolutions]}


def student_spec(cfg: Config, stage: int) -> tuple[str, ModelSpec]:
    return ("proxy", cfg.proxy) if stage == 1 else ("student", cfg.student)


def target_specs(cfg: Config, stage: int) -> list[tuple[str, str, ModelSpec, float]]:
    """(name, config field, spec, loss weight) for each target of ``stage``."""
    if stage == 1:
        return [(t.name, f"teachers.{i}", t, t.loss_weight) for i, t in enumerate(cfg.teachers)]
    return [("proxy", "proxy", cfg.proxy, 1.0)]


def target_resolutions(cfg: Config, stage: int, spec: ModelSpec) -> list[int]:
    """The sizes a target of ``stage`` is asked for: ``teacher_resolutions``, or the target's own ``img_size``."""
    return list(cfg.stage(stage).teacher_resolutions or [spec.img_size])


def check_models(cfg: Config, stage: int) -> None:
    """Every model name of the recipe (a typo in the student fails stage 1, not days later) and every
    weights file the stage loads, before anything is built or written."""
    named = [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)] + [("proxy", cfg.proxy), ("student", cfg.student)]
    for where, s in named:
        check_model_name(s.model, f"{where}.model")
    field, spec = student_spec(cfg, stage)
    for _, where, s, _ in target_specs(cfg, stage) + [(field, field, spec, 1.0)]:
        check_weights(s.weights, f"{where}.weights")


def check_proxy(cfg: Config, stage: int, random_proxy: bool) -> None:
    """Stages 2 and 3 distil the stage-1 proxy: its weights are required, unless ``--random-proxy`` says on
    purpose that a randomly initialised one will do (tests)."""
    if stage == 1:
        if random_proxy:
            raise EupeError("--random-proxy: stage 1 trains the proxy; the flag is for stages 2 and 3")
        return
    if cfg.proxy.weights and random_proxy:
        raise EupeError(f"--random-proxy contradicts proxy.weights {cfg.proxy.weights}: pass one of them")
    if not cfg.proxy.weights and not random_proxy:
        raise EupeError(f"stage {stage} distils the proxy, but no proxy weights are given: pass --proxy <the stage-1 "
                        "encoder.safetensors> or set proxy.weights (--random-proxy distils a random proxy, for tests)")


def check_init(stage: int, init: str | None, from_scratch: bool) -> None:
    """Stage 3 continues the stage-2 student: ``--init`` is required, unless ``--from-scratch`` says on purpose
    that a randomly initialised student will do (tests)."""
    if init is not None and from_scratch:
        raise EupeError(f"--from-scratch contradicts --init {init}: pass one of them")
    if stage == 3 and init is None and not from_scratch:
        raise EupeError("stage 3 fine-tunes the stage-2 student: pass --init <a stage-2 checkpoint's model.safetensors> "
                        "(--from-scratch trains a randomly initialised student, for tests)")


def model_inputs(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = input_norm(model)
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def build_targets(cfg: Config, stage: int, device: torch.device) -> list[Target]:
    out = []
    for i, (name, where, spec, weight) in enumerate(target_specs(cfg, stage)):
        # Seeded per target: a randomly initialised target (tests, the demo) is the same network
        # in `eupe normalize`, in `eupe train` and on every rank.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1000 + stage * 100 + i)
            model = freeze(build_model(spec, where))
        digest = weights_digest(model)
        model.to(device)
        mean, std = model_inputs(model, device)
        out.append(Target(name, model, target_resolutions(cfg, stage, spec), weight, mean, std, digest))
    return out


def prepare(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> float, resized to ``size`` (antialiased), normalized for the model."""
    x = images.to(mean.device, non_blocking=True).float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - mean) / std


def prepare_for(model: nn.Module, images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """:func:`prepare` at the size ``model`` runs at when asked for ``size``: resized to a whole number of its
    tokens (:func:`eupe.models.features.aligned_size`), so that its token grid covers exactly the image."""
    return prepare(images, aligned_size(model, size), mean, std)


def target_features(target: Target, images: torch.Tensor, size: int) -> Features:
    """One batched forward of a frozen target; outputs are ordinary tensors usable as loss targets."""
    with torch.inference_mode():
        f = extract_features(target.model, prepare_for(target.model, images, size, target.mean, target.std))
    return Features(f.cls.clone(), f.patches.clone(), f.grid)
