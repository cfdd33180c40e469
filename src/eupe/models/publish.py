"""The trained encoder as a folder timm and the Hugging Face Hub read: ``model.safetensors`` (with metadata) and
``config.json`` (architecture, the arguments that rebuild it, ``pretrained_cfg`` with input size, mean and std,
and an ``eupe`` section: stage, summary vector, lineage). Written with timm's own ``save_for_hf``, so

    timm.create_model("local-dir:<folder>", pretrained=True)

rebuilds the encoder with no project code (or ``pretrained_cfg_overlay=dict(file=".../model.safetensors")`` on
the architecture's name with the same ``model_args``); the folder can be pushed to the Hub as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import eupe
from eupe.config import ModelSpec
from eupe.models.features import resolve_summary
from eupe.models.registry import build_model, input_norm

MODEL_DIR = "model"  # under a training step's --out (and a registry version)
WEIGHTS = "model.safetensors"


def write_model_folder(folder: Path, spec: ModelSpec, state: dict[str, torch.Tensor], lineage: dict) -> Path:
    """``state`` (the encoder's weights) as a timm/HF model folder, rebuilt on the CPU from ``spec``."""
    from timm.models import save_for_hf

    model: nn.Module = build_model(spec.model_copy(update={"weights": None}), "model")
    model.load_state_dict({k: v.cpu() for k, v in state.items()})
    mean, std = input_norm(model)
    size = (3, spec.img_size, spec.img_size)
    eupe_meta = {"version": eupe.__version__, "summary": resolve_summary(model), **lineage}
    save_for_hf(model, str(folder), model_config={"eupe": eupe_meta}, safe_serialization=True,
                data_config={"input_size": size, "mean": mean, "std": std, "crop_pct": 1.0})
    config = json.loads((folder / "config.json").read_text())
    metadata = {"format": "pt", "architecture": config["architecture"], "model_args": json.dumps(config.get("model_args", {})),
                "input_size": json.dumps(list(size)), "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
                "eupe": json.dumps(eupe_meta)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS), metadata=metadata)
    return folder
