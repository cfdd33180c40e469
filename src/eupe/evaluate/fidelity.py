"""Distillation fidelity: how closely the trained encoder, through its training adapters, reproduces
each target's features (normalized with the stage's frozen statistics) on held-out images.

Cosine similarity, averaged over images for the class token and over every token for the patches;
the headline number per target is the mean of the two (the loss's cosine terms, as a similarity)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eupe.distill.normalize import FeatureStats
from eupe.distill.targets import Target, target_features
from eupe.errors import EupeError
from eupe.models.adapter import TargetAdapter
from eupe.models.features import Features
from eupe.models.registry import read_state_dict

_PREFIX = "adapters."
_REQUIRED = ("cls.0.weight", "patch.0.weight")  # sizes the adapter (hidden width)


def adapter_states(checkpoint: str, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter state of each target of ``names`` in a training checkpoint (``adapters.<target>.*``
    keys), checked before any compute: a checkpoint without them fails naming the target."""
    state = read_state_dict(checkpoint)
    have = sorted({k.split(".")[1] for k in state if k.startswith(_PREFIX) and k.count(".") >= 2})
    out = {}
    for name in names:
        own = {k[len(_PREFIX) + len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{_PREFIX}{name}.")}
        if not own:
            raise EupeError(f"--checkpoint {checkpoint}: no adapter for target {name!r} (adapters: {have or 'none'}); "
                            "pass a training checkpoint (checkpoints/step_*/model.safetensors), not an exported encoder")
        missing = [k for k in _REQUIRED if k not in own]
        if missing:
            raise EupeError(f"--checkpoint {checkpoint}: adapter {name!r} lacks {_PREFIX}{name}.{missing[0]}")
        out[name] = own
    return out


def build_adapters(checkpoint: str, states: dict[str, dict[str, torch.Tensor]], stats: dict[str, FeatureStats],
                   student_dims: tuple[int, int]) -> dict[str, TargetAdapter]:
    """Eval-mode adapters from :func:`adapter_states`; one that does not fit the encoder or the statistics
    fails naming it."""
    adapters = {}
    for name, own in states.items():
        if name not in stats:
            raise EupeError(f"--norm: no statistics for target {name!r} (has {sorted(stats)})")
        adapter = TargetAdapter(student_dims, stats[name].dims, own["cls.0.weight"].shape[0])
        try:
            adapter.load_state_dict(own)
        except RuntimeError as e:
            raise EupeError(f"--checkpoint {checkpoint}: adapter {name!r} does not fit the evaluated encoder "
                            f"and --norm statistics: {str(e).splitlines()[-1].strip()[:200]}") from None
        adapters[name] = adapter.eval()
    return adapters


def closest(resolutions: list[int], size: int) -> int:
    return min(resolutions, key=lambda r: (abs(r - size), r))


@torch.inference_mode()
def fidelity_batch(student: Features, images: torch.Tensor, targets: list[Target], adapters: dict[str, TargetAdapter],
                   stats: dict[str, FeatureStats], size: int) -> dict[str, torch.Tensor]:
    """Per target: [2] sums of (class-token cosine over images, patch cosine averaged per image)."""
    out = {}
    for t in targets:
        f = target_features(t, images, closest(t.resolutions, size))
        want_cls, want_patch = stats[t.name].apply(f.cls, f.patches)
        adapter = adapters[t.name].to(want_cls.device)
        s = Features(student.cls.to(want_cls.device).float(), student.patches.to(want_cls.device).float(), student.grid)
        got_cls, got_patch = adapter(s, f.grid)
        cls = F.cosine_similarity(got_cls.float(), want_cls, dim=-1)
        patch = F.cosine_similarity(got_patch.float(), want_patch, dim=-1).mean(-1)
        out[t.name] = torch.stack([cls.sum(), patch.sum()]).cpu()
    return out
