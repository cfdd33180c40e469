"""One registry for teachers, proxy and students: timm names in, frozen or trainable modules out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from eupe import storage
from eupe.config import ModelSpec
from eupe.errors import EupeError
from eupe.models.features import SUMMARY_ATTR, resolve_summary

# The paper's student family; any other timm name is accepted as is.
STUDENTS: dict[str, str] = {
    "vit_t": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "convnext_t": "convnext_tiny",
    "convnext_b": "convnext_base",
}

# Transformers take any input size (position embeddings interpolated, odd sizes padded to the patch).
_VIT_KWARGS = ("img_size", "dynamic_img_size", "dynamic_img_pad")
# Keys our own checkpoints prefix the trained encoder with (see distill.checkpoint).
_ENCODER_PREFIX = "encoder."


def check_model_name(name: str, field: str = "model") -> str:
    """Resolve a student alias; fail with one line when timm does not know the name."""
    resolved = STUDENTS.get(name, name)
    source, colon, rest = resolved.partition(":")
    if colon and source in ("hf-hub", "local-dir"):  # timm's own prefixes: a Hub repo or a model folder
        if not rest or (source == "local-dir" and not (Path(rest) / "config.json").is_file()):
            raise EupeError(f"{field}: {name!r}: no timm model {'folder with config.json' if rest else 'name'} there")
        return resolved
    if not timm.is_model(resolved):
        raise EupeError(f"{field}: unknown timm model {name!r}")
    return resolved


def check_weights(uri: str | None, field: str = "weights") -> None:
    """Fail before any compute when a configured checkpoint is missing."""
    if uri is None or uri == "hub":
        return
    if not storage.exists(uri):
        raise EupeError(f"{field}: checkpoint not found: {uri}")


def build_model(spec: ModelSpec, field: str = "model") -> nn.Module:
    """Create a timm model without its classifier and load ``spec.weights`` when given."""
    name = check_model_name(spec.model, f"{field}.model")
    check_weights(spec.weights, f"{field}.weights")
    vit = {"img_size": spec.img_size, "dynamic_img_size": True, "dynamic_img_pad": True}
    kwargs = {"num_classes": 0, **spec.kwargs}
    try:
        try:
            model = timm.create_model(name, pretrained=spec.weights == "hub", **{**vit, **kwargs})
        except TypeError as e:
            if not any(k in str(e) for k in _VIT_KWARGS):
                raise
            model = timm.create_model(name, pretrained=spec.weights == "hub", **kwargs)  # CNNs: any size as is
    except (TypeError, ValueError, AssertionError, RuntimeError, IndexError, ZeroDivisionError) as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise EupeError(f"{field}.kwargs {spec.kwargs}: timm cannot build {name} with them: {detail}") from None
    setattr(model, SUMMARY_ATTR, spec.summary)  # extract_features takes the summary vector this way
    try:
        resolve_summary(model)
    except ValueError as e:
        raise EupeError(f"{field}.summary: {e}") from None
    if spec.weights and spec.weights != "hub":
        load_weights(model, spec.weights, field)
    return model


def read_state_dict(uri: str, shapes_only: bool = False) -> dict[str, torch.Tensor] | dict[str, tuple[int, ...]]:
    """safetensors, or a PyTorch state dict loaded with ``weights_only=True``; local path or s3://; a model folder
    (``eupe.models.publish``: timm/HF layout) gives its ``model.safetensors``. ``shapes_only``: each tensor's
    shape, read from the safetensors header (a PyTorch file is memory-mapped) without reading the tensors."""
    if not storage.is_s3(uri) and (Path(uri) / "model.safetensors").is_file():
        uri = str(Path(uri) / "model.safetensors")
    path = storage.local_copy(uri)
    try:
        if Path(path).suffix == ".safetensors":
            if not shapes_only:
                return load_file(str(path))
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
        except RuntimeError:  # mmap needs the zip format: a legacy file is read whole
            if not shapes_only:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which one
        raise EupeError(f"cannot read weights {uri}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EupeError(f"cannot read weights {uri}: not a state dict")
    return {k: tuple(v.shape) for k, v in state.items()} if shapes_only else state


def _encoder_keys(state: dict) -> dict:
    """A checkpoint of ours holds the encoder under ``encoder.`` (take it alone); DDP's ``module.`` goes."""
    if any(k.startswith(_ENCODER_PREFIX) for k in state):
        state = {k[len(_ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(_ENCODER_PREFIX)}
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_fit(model: nn.Module, shapes: dict[str, tuple[int, ...]], uri: str, field: str) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    wrong = [k for k in own if k in shapes and shapes[k] != own[k]]
    if missing or unexpected or wrong:
        raise EupeError(
            f"{field}.weights {uri} does not fit {type(model).__name__}: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]})"
        )


def load_weights(model: nn.Module, uri: str, field: str = "model") -> None:
    state = _encoder_keys(read_state_dict(uri))
    _check_fit(model, {k: tuple(v.shape) for k, v in state.items()}, uri, field)
    model.load_state_dict(state)


def check_fits(spec: ModelSpec, field: str = "model") -> None:
    """``spec.weights`` fit ``spec.model`` (every name and shape), checked before any compute without reading a
    tensor: the file's header against the model built on the meta device (no memory, a fraction of a second
    for a 1.9B teacher)."""
    if not spec.weights or spec.weights == "hub":
        return
    with torch.device("meta"):
        model = build_model(spec.model_copy(update={"weights": None}), field)
    _check_fit(model, _encoder_keys(read_state_dict(spec.weights, shapes_only=True)), spec.weights, field)


def freeze(model: nn.Module) -> nn.Module:
    """Teachers: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def input_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the model family was trained with (PE: 0.5/0.5, DINOv3 and ConvNeXt: ImageNet)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's weights as loaded (names, dtypes, shapes, bytes): the same for a file, the hub or
    a seeded random initialisation, and different as soon as one tensor differs."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()
