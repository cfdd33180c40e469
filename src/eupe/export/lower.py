"""Eager encoder -> ExecuTorch program: a fixed-size copy, ``torch.export``, optional int8 PTQ with the
XNNPACK quantizer, lowering with the XNNPACK partitioner, and a count of what was not delegated."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from eupe.config import ModelSpec
from eupe.errors import EupeError
from eupe.export.runtime import first_line
from eupe.models.features import extract_features
from eupe.models.registry import build_model

# Tuple unpacking of a delegate's outputs: plumbing, not an operator left to the portable kernels.
_PLUMBING = {"getitem"}


class EncoderOutputs(nn.Module):
    """The graph a device runs: a normalized image ``[1, 3, R, R]`` -> (class token ``[1, C]``,
    patch tokens ``[1, N, D]``), exactly what :func:`eupe.models.features.extract_features` returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = extract_features(self.model, x)
        return f.cls, f.patches


def check_size(model: nn.Module, spec: ModelSpec, size: int, field_name: str = "export.resolutions") -> None:
    """A ViT is exported on a whole number of patches."""
    patch = tuple(getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1)))
    if size % patch[0] or size % patch[1]:
        raise EupeError(f"{field_name}: {size} px is not a multiple of {spec.model}'s patch size {patch[0]}")


def fixed_size(model: nn.Module, spec: ModelSpec, size: int, field_name: str = "export.resolutions") -> nn.Module:
    """``model`` for ``size`` x ``size`` inputs only, with the same outputs there.

    A timm ViT built with ``dynamic_img_size`` resamples its position embedding in every forward, and
    under ``torch.export`` timm always emits that resampling (a bicubic antialiased upsample, which is
    no ExecuTorch core op). The copy has the embedding resampled once, here, by timm's own
    ``set_input_size`` (the same interpolation), and is rebuilt with a static patch grid. CNNs take
    any size as they are. Attention is switched from fused SDPA to timm's explicit matmul-softmax
    path, which XNNPACK takes whole (SDPA decomposes with masking ops that it does not).
    """
    if not hasattr(model, "dynamic_img_size"):
        return model
    check_size(model, spec, size, field_name)
    resized = copy.deepcopy(model)
    resized.set_input_size(img_size=(size, size))
    static = {**spec.kwargs, "dynamic_img_size": False, "dynamic_img_pad": False}
    fixed = build_model(spec.model_copy(update={"img_size": size, "weights": None, "kwargs": static}))
    fixed.load_state_dict(resized.state_dict())
    for module in fixed.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return fixed.eval()


@dataclass
class Lowered:
    program: bytes  # the .pte
    delegated_nodes: int
    subgraphs: int  # XNNPACK partitions
    non_delegated: dict[str, int] = field(default_factory=dict)  # edge op -> count, run by portable kernels


def quantize_int8(module: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """Post-training int8 (XNNPACK quantizer, symmetric, per-channel weights) calibrated on the image
    batches of ``calibration``. The graph observed is exported with a dynamic batch so that calibration
    runs batched (the observers cost per call, not per image); the result is exported again at
    ``example``'s static shape by :func:`lower`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    two = example[:1].expand(2, *example.shape[1:]).contiguous()  # batch 1 would be specialised away
    graph = torch.export.export(module, (two,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph.module(), quantizer)
    seen = 0
    for x in calibration:
        prepared(x if x.shape[0] > 1 else x.expand(2, *x.shape[1:]))
        seen += x.shape[0]
    if not seen:
        raise EupeError("int8 calibration: no images")
    return convert_pt2e(prepared)


def lower(module: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor] | None = None,
          name: str = "model") -> Lowered:
    """``torch.export`` of an eval-mode ``module`` at the static shape of ``example`` (int8 when
    ``calibration`` batches are given), lower to XNNPACK, serialize. The delegation summary comes from
    ExecuTorch's ``get_delegation_info``. A graph that cannot be exported, quantized or lowered fails
    with one line naming ``name`` and the first line of the underlying error."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    try:
        with torch.no_grad():
            if calibration is not None:
                module = quantize_int8(module, example, calibration)
            program = torch.export.export(module, (example,), strict=False)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        info = get_delegation_info(edge.exported_program().graph_module)
        buffer = bytes(edge.to_executorch().buffer)
    except EupeError:
        raise
    except Exception as e:  # noqa: BLE001 -- torch.export, the quantizer and exir raise many types, multi-line
        raise EupeError(f"{name}: cannot lower to ExecuTorch/XNNPACK: {first_line(e)}") from None
    left = {op: b.non_delegated for op, b in sorted(info.delegation_by_operator.items())
            if b.non_delegated and op not in _PLUMBING}
    return Lowered(buffer, info.num_delegated_nodes, info.num_delegated_subgraphs, left)
