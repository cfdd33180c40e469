"""Eager encoder -> ExecuTorch program: a fixed-size copy, ``torch.export``, optional int8 PTQ with the
XNNPACK quantizer (dynamic or static activations), the rewrites that let XNNPACK take every operator,
lowering with the XNNPACK partitioner (one method, or one per input size in a single program), and a
count of what was not delegated."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.export import ExportedProgram

from eupe.config import ModelSpec
from eupe.errors import EupeError
from eupe.export.blocks import xnnpack_blocks
from eupe.export.depthwise import split_depthwise
from eupe.export.rewrite import GemmLayerNorm, forget_provenance, gemm_layer_norms, xnnpack_friendly
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


Int8 = Literal["dynamic", "static"]


@dataclass
class Lowered:
    program: bytes  # the .pte
    delegated_nodes: int
    subgraphs: int  # XNNPACK partitions, over all methods
    non_delegated: dict[str, int] = field(default_factory=dict)  # edge op -> count, run by portable kernels
    methods: list[str] = field(default_factory=lambda: ["forward"])


def quantize_int8(module: nn.Module, example: torch.Tensor, activations: Int8 = "dynamic",
                  calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Post-training int8 with the XNNPACK quantizer: symmetric per-channel int8 weights, and int8
    activations either quantized at run time per input (``dynamic``: XNNPACK's qd8 GEMMs, no calibration,
    what ONNX Runtime's dynamic quantization does) or with scales calibrated once on the image batches of
    ``calibration`` (``static``). Static calibration observes a graph exported with a dynamic batch so
    that it runs batched (the observers cost per call, not per image); the result is exported again at
    ``example``'s static shape by :func:`to_program`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    dynamic = activations == "dynamic"
    if dynamic:
        graph = torch.export.export(module, (example,), strict=False)
        batches: Iterable[torch.Tensor] = [example]  # the weight observers' one pass
    else:
        two = example[:1].expand(2, *example.shape[1:]).contiguous()  # batch 1 would be specialised away
        graph = torch.export.export(module, (two,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
        batches = (x if x.shape[0] > 1 else x.expand(2, *x.shape[1:]) for x in calibration or [])
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    quantizer.set_module_type(GemmLayerNorm, None)  # normalization statistics stay fp32
    if dynamic:
        quantizer.set_filter_function(_dynamic_conv_ok)
    prepared = prepare_pt2e(graph.module(), quantizer)
    seen = 0
    for x in batches:
        prepared(x)
        seen += x.shape[0]
    if not seen:
        raise EupeError("int8 calibration: no images")
    return convert_pt2e(prepared)


def _dynamic_conv_ok(node: torch.fx.Node) -> bool:
    """Dynamic int8 for every linear, but for a convolution only where it reads the image (a ViT's patch
    embedding, a CNN's stem). ExecuTorch 1.5's channels-last pass, converting the input of a dynamically
    quantized convolution to NHWC, walks back through every first argument to the graph input and
    rewires the whole chain, so that a convolution after other delegated operators (ConvNeXt's
    downsampling, after a LayerNorm) fails at run time; those few convolutions stay fp32."""
    if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default):
        return getattr(node.args[0], "op", None) == "placeholder"
    return True


def to_program(module: nn.Module, example: torch.Tensor, int8: Int8 | None = None,
               calibration: Iterable[torch.Tensor] | None = None, rewrite_modules: bool = True) -> ExportedProgram:
    """``torch.export`` of an eval-mode ``module`` at the static shape of ``example`` (quantized first when
    ``int8`` is given), rewritten so that XNNPACK takes every compute operator (:mod:`eupe.export.rewrite`):
    ViT blocks as :func:`~eupe.export.blocks.xnnpack_blocks`, large depthwise convolutions (ConvNeXt's 7 x 7) as
    :func:`~eupe.export.depthwise.split_depthwise` and LayerNorms as :class:`~eupe.export.rewrite.GemmLayerNorm`
    first, the rest on the exported graph. ``rewrite_modules=False`` leaves timm's blocks and convolutions as
    they are (``benchmarks/export_latency.py --plain``: the rewrites' A/B)."""
    with torch.no_grad():
        if rewrite_modules:
            module = split_depthwise(xnnpack_blocks(module, int8=int8 is not None))
        module = gemm_layer_norms(module)
        if int8 is not None:
            module = quantize_int8(module, example, int8, calibration)
        return xnnpack_friendly(torch.export.export(module, (example,), strict=False))


def _targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op == "call_function"}


def _has(*names: str) -> Callable[[torch.fx.GraphModule], bool]:
    """Whether the graph calls an operator whose name contains one of ``names``."""
    return lambda gm: any(name in t for t in _targets(gm) for name in names)


def _has_conv1d(gm: torch.fx.GraphModule) -> bool:
    return any("convolution" in str(n.target) and getattr(n.meta.get("val"), "dim", lambda: 0)() == 3
               for n in gm.graph.nodes if n.op == "call_function")


def _has_wide_cat(gm: torch.fx.GraphModule) -> bool:
    return any("cat" in str(n.target) and n.args and len(n.args[0]) > 5 for n in gm.graph.nodes if n.op == "call_function")


# XNNPACK's own passes that only rewrite an operator pattern, and when each has something to do. The backend
# runs all of them on every partition, and each one that is an ExportPass re-traces the whole graph through
# fake tensors (ViT-B: 3-9 s a pass, 40% of the passes' time for patterns none of our encoders has).
_XNNPACK_PASS_GUARDS: dict[str, Callable[[torch.fx.GraphModule], bool]] = {
    "DimOrderOpsRevertPass": _has("dim_order"),
    "ConvertToUpsampleBilinear2d": _has("upsample", "index"),  # bilinear decomposes to _unsafe_index
    "PropagateCustomMetaPass": lambda gm: any("custom" in n.meta for n in gm.graph.nodes),
    "FuseBatchNormPass": _has("batch_norm"),
    "DecomposeBatchNorm": _has("batch_norm"),
    "DecomposeConcatenate": _has_wide_cat,  # splits a cat of more than 5 inputs
    "RemoveGetItemPass": _has("max_pool2d_with_indices", "max.dim"),
    "Conv1dUnsqueezePass": _has_conv1d,
    "PReLUReshapePass": _has("prelu"),
}


@contextlib.contextmanager
def _needed_xnnpack_passes() -> Iterator[None]:
    """XNNPACK's preprocess with the passes of :data:`_XNNPACK_PASS_GUARDS` left out of a partition that has
    nothing for them (the same program, fewer re-traces: a third off lowering a ViT-B)."""
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    class NeededPasses(XNNPACKPassManager):
        def transform(self):
            gm = self.exported_program.graph_module
            self.passes = [p for p in self.passes if _XNNPACK_PASS_GUARDS.get(p.__name__, lambda _: True)(gm)]
            return super().transform()

    xnnpack_preprocess.XNNPACKPassManager = NeededPasses
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = XNNPACKPassManager


def lower_methods(programs: dict[str, Callable[[], ExportedProgram]], name: str = "model") -> Lowered:
    """One ExecuTorch program with a method per entry of ``programs`` (each built by its callable), lowered
    to XNNPACK and serialized. Methods share the constants they have in common: XNNPACK keeps its weights in
    the program's named data, keyed by content, so a weight several methods use is stored once. The
    delegation summary comes from ExecuTorch's ``get_delegation_info``, summed over the methods. A graph
    that cannot be exported, quantized or lowered fails with one line naming ``name`` and the first line
    of the underlying error."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    try:
        exported = {method: build() for method, build in programs.items()}
        with _needed_xnnpack_passes():
            edge = to_edge_transform_and_lower(exported if len(exported) > 1 or "forward" not in exported
                                               else exported["forward"],
                                               partitioner=[XnnpackPartitioner()], transform_passes=[forget_provenance])
        infos = [get_delegation_info(edge.exported_program(m).graph_module) for m in exported]
        buffer = bytes(edge.to_executorch().buffer)
    except EupeError:
        raise
    except Exception as e:  # noqa: BLE001 -- torch.export, the quantizer and exir raise many types, multi-line
        raise EupeError(f"{name}: cannot lower to ExecuTorch/XNNPACK: {first_line(e)}") from None
    left: dict[str, int] = {}
    for info in infos:
        for op, b in info.delegation_by_operator.items():
            if b.non_delegated and op not in _PLUMBING:
                left[op] = left.get(op, 0) + b.non_delegated
    return Lowered(buffer, sum(i.num_delegated_nodes for i in infos), sum(i.num_delegated_subgraphs for i in infos),
                   dict(sorted(left.items())), list(exported))


def lower(module: nn.Module, example: torch.Tensor, name: str = "model", int8: Int8 | None = None,
          calibration: Iterable[torch.Tensor] | None = None) -> Lowered:
    """A one-method (``forward``) program: :func:`to_program` then :func:`lower_methods`."""
    return lower_methods({"forward": lambda: to_program(module, example, int8, calibration)}, name)
