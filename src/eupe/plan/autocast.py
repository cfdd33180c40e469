"""bf16 autocast as CUDA runs it, on the CPU tensors the plan measures with.

The plan runs the step on fake CPU tensors (FSDP2 and the fake process group need a device they can reach, and
this machine has no GPU), under CPU autocast. CPU and CUDA autocast agree on what runs in bf16 (convolutions,
``linear``, ``matmul``, ``bmm``, ``scaled_dot_product_attention``: ATen's ``AT_FORALL_LOWER_PRECISION_FP`` and the
CPU list), but CUDA also runs a list of operators in fp32 whatever their input (``AT_FORALL_FP32``: ``layer_norm``,
``rms_norm``, ``group_norm``, ``cosine_similarity``, the losses, ``exp``/``log``/``pow``, bilinear upsampling...)
and gives ``softmax``, ``log_softmax``, ``sum``, ``cumsum`` and ``prod`` an fp32 output
(``AT_FORALL_FP32_SET_OPT_DTYPE``), where CPU autocast leaves them in bf16. :class:`CudaAutocastLists` applies
those two lists on top of CPU autocast, so that the tensors a step keeps have the dtypes they have on a GPU
(the LayerNorm and GELU of an adapter over bf16 tokens keep fp32 tensors there, twice the bytes).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# ATen's AT_FORALL_FP32 (CUDA autocast runs them in fp32), by the Python names they are called with.
FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "__pow__", "__rpow__", "float_power", "softplus", "layer_norm", "rms_norm", "group_norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "interpolate", "upsample", "upsample_bilinear", "upsample_nearest",
})
# ATen's AT_FORALL_FP32_SET_OPT_DTYPE: computed with dtype=float32 when no dtype is asked for.
FP32_OUTPUT_OPS = frozenset({"softmax", "log_softmax", "sum", "cumsum", "prod"})
_LOW = (torch.bfloat16, torch.float16)


def _low(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in _LOW


def _to_fp32(x: object) -> object:
    if _low(x):
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


class CudaAutocastLists(TorchFunctionMode):
    """While CPU autocast is on: CUDA autocast's fp32 operators get fp32 inputs, its fp32-output reductions an
    fp32 ``dtype``. Out-of-place calls only (autocast never casts in-place ones either)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if torch.is_autocast_enabled("cpu") and not (name.endswith("_") and not name.startswith("__")):
            if name in FP32_OPS and any(_low(a) for a in (*args, *kwargs.values())):
                return func(*_to_fp32(tuple(args)), **{k: _to_fp32(v) for k, v in kwargs.items()})
            if name in FP32_OUTPUT_OPS and args and _low(args[0]) and kwargs.get("dtype") is None:
                return func(*args, **{**kwargs, "dtype": torch.float32})
        return func(*args, **kwargs)


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` with :class:`CudaAutocastLists` still active in the autograd engine, where activation
    checkpointing recomputes blocks (``Tensor.backward`` is itself a torch function: a mode handling it steps
    aside for the whole backward). This is what ``torch.autograd.backward`` runs for a scalar loss."""
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def gpu_autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """What ``Runtime.autocast()`` does on a GPU, here: CPU autocast to ``dtype`` (nothing when ``dtype`` is None:
    fp32). CUDA's operator lists apply where :class:`CudaAutocastLists` is active around the whole step: it must
    also be active in the backward, where activation checkpointing recomputes a block under the autocast state
    it saved (and checks that the recomputed tensors have the dtypes of the saved ones)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)
