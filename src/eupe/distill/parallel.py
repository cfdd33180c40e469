"""How a stage's models are spread over the ranks of a ``torchrun`` job (``distributed`` in the config).

* ``ddp``: every rank holds the whole trained model, its gradients and optimizer state, and every target;
  gradients are all-reduced (``DistributedDataParallel``).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) per transformer block (per stage of a CNN) of the
  trained encoder, then the whole model (encoder, adapters) as the root; with ``shard_targets`` each frozen
  target too. Parameters, gradients and AdamW moments are sharded over the ranks; a block's parameters are
  gathered for its forward and backward only. ``param_dtype``/``reduce_dtype``: the mixed-precision policy.

Independent of the strategy: ``activation_checkpointing`` recomputes each block in the backward (timm's own
``set_grad_checkpointing``), ``compile`` compiles each block of the trained encoder (``nn.Module.compile``).
A single process runs the plain model (FSDP needs a process group).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from eupe.config import Config
from eupe.distill.runtime import Runtime
from eupe.errors import EupeError

_FORWARD_METHODS = ("forward_features", "forward_head")  # what extract_features calls on a model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units of a timm encoder: ViT/Eva ``blocks``, ConvNeXt ``stages``."""
    for name in ("blocks", "stages"):
        found = getattr(model, name, None)
        if isinstance(found, (nn.Sequential, nn.ModuleList)) and len(found):
            return list(found)
    raise EupeError(f"{type(model).__name__}: no blocks or stages to shard or checkpoint")


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _policy(cfg: Config, rt: Runtime):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    d = cfg.distributed
    bf16 = d.param_dtype == "bf16" or (d.param_dtype == "auto" and rt.amp_dtype == torch.bfloat16)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32,
                                reduce_dtype=torch.bfloat16 if d.reduce_dtype == "bf16" else torch.float32)


def parallelize(model: nn.Module, targets: list, cfg: Config, rt: Runtime) -> nn.Module:
    """The module the training step calls (``model`` itself, DDP around it, or ``model`` sharded in place)."""
    d = cfg.distributed
    encoder = model.encoder
    if d.activation_checkpointing:
        encoder.set_grad_checkpointing(True)
    if d.compile:
        for block in blocks(encoder):
            block.compile()
    if rt.world_size == 1:
        return model
    if d.strategy == "ddp":
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    policy = _policy(cfg, rt)
    for block in blocks(encoder):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: the encoder's embeddings and norms, the adapters
    if d.shard_targets:
        for t in targets:
            for block in blocks(t.model):
                fully_shard(block)
            fully_shard(t.model)
            for method in _FORWARD_METHODS:  # timm's forward_features bypasses forward: gather the root's params
                register_fsdp_forward_method(t.model, method)
    return model


def no_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation: no gradient communication on the micro-batches before the last."""
    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, unsharded, on the CPU of rank 0 (other ranks: empty); every rank calls it."""
    if not is_fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(model: nn.Module, opt: torch.optim.Optimizer, staging: Path) -> dict | None:
    """DDP or one process: the optimizer's state dict (it goes into ``state.pt``). FSDP: every rank writes its
    shard into ``staging`` with ``torch.distributed.checkpoint`` (resharded on load, to any number of ranks)."""
    if not is_fsdp(model):
        return opt.state_dict()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(staging))
    return None


def load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict, checkpoint: Path) -> None:
    """The optimizer state a checkpoint holds, from ``state.pt`` or from its ``optim/`` shards (any world size)."""
    if state.get("optimizer") is not None:
        if is_fsdp(model):
            raise EupeError(f"--resume: {checkpoint} holds a whole-model optimizer state (a DDP run): set "
                            "distributed.strategy: ddp to resume it")
        opt.load_state_dict(state["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    shards = checkpoint / "optim"
    if not shards.is_dir():
        raise EupeError(f"--resume: {checkpoint} has neither an optimizer state nor optim/ shards")
    template = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(template, checkpoint_id=str(shards))
    set_optimizer_state_dict(model, opt, template["optim"])
