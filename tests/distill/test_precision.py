"""``precision: bf16``: autocast really runs the student in bf16 (on the CPU too), while the EUPE loss stays
fp32; and a whole stage-2 run under it trains to finite losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import reference
from eupe.cli import main
from eupe.config import load_config
from eupe.distill.normalize import FeatureStats
from eupe.distill.runtime import setup, teardown
from eupe.distill.targets import build_targets, model_inputs, prepare
from eupe.distill.trainer import build_distill_model, student_loss, target_batch
from eupe.models.features import feature_dims

STAGE = 2


def _native_bf16() -> str:
    """Whether this CPU computes bf16 natively (autocast works everywhere, emulated it is only slower)."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = None
    return f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 (oneDNN): {native}"


def _loss_and_adapter_outputs(cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor], dict]:
    """The trainer's student loss on one random micro-batch of stage 2, with what the adapters returned
    and the normalized targets it was computed against."""
    rt = setup(cfg)
    try:
        assert rt.device.type == "cpu"
        torch.manual_seed(0)
        targets = build_targets(cfg, STAGE, rt.device)
        size = cfg.stage(STAGE).resolutions[0]
        stats = {}
        for t in targets:  # unit statistics of the right widths: this test is about dtypes, not values
            c, p = feature_dims(t.model, size)
            stats[t.name] = FeatureStats(torch.zeros(c), torch.ones(c), torch.zeros(p), torch.ones(p))
        model = build_distill_model(cfg, STAGE, stats, targets).train()
        seen: list[torch.Tensor] = []
        for adapter in model.adapters.values():
            adapter.register_forward_hook(lambda mod, inp, out: seen.extend(o.detach() for o in out))
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        sizes = {"student": size, **{t.name: size for t in targets}}
        with rt.autocast():  # as the trainer's micro step runs them
            grids, normed = target_batch(targets, stats, images, sizes)
        x = prepare(images, size, *model_inputs(model.encoder, rt.device))
        with rt.autocast():
            loss, parts = student_loss(model, x, grids, normed, targets, cfg.loss)
        loss.backward()
        return loss, parts, seen, normed
    finally:
        teardown()


def test_bf16_autocast_runs_the_student_in_bf16_and_keeps_the_loss_fp32(tiny_config: Path) -> None:
    print(_native_bf16())
    loss, parts, preds, normed = _loss_and_adapter_outputs(load_config(tiny_config, ["precision=bf16"]))
    dtypes = [p.dtype for p in preds]
    assert len(preds) == 2 and set(dtypes) == {torch.bfloat16}, f"autocast is off: the adapters gave {dtypes}"
    assert loss.dtype == torch.float32, f"the distillation loss is {loss.dtype}"
    assert all(v.dtype == torch.float32 for v in parts.values()), {k: v.dtype for k, v in parts.items()}
    assert torch.isfinite(loss) and loss.item() > 0
    # Computed in fp32, not merely returned as fp32: equal to the loss of the very same bf16 outputs in fp64
    # (a cosine taken in bf16 would be off by ~1e-3 relative, an fp32 one by ~1e-7).
    expected = reference.eupe_loss(*(p.double() for p in preds), *(t.double() for t in normed["proxy"]))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)

    # the control: fp32 (and `auto` on a machine without a GPU) runs no autocast at all
    for precision in ("fp32", "auto"):
        loss32, _, preds32, _ = _loss_and_adapter_outputs(load_config(tiny_config, [f"precision={precision}"]))
        assert {p.dtype for p in preds32} == {torch.float32} and loss32.dtype == torch.float32, precision
    assert loss.item() != loss32.item() and loss.item() == pytest.approx(loss32.item(), rel=5e-2)


@pytest.mark.slow
def test_bf16_stage2_run_trains_to_finite_losses(tiny_config: Path, tmp_path: Path) -> None:
    print(_native_bf16())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ["--config", str(tiny_config), "--stage", str(STAGE), "--random-proxy"]
        assert main(["normalize", *common, "--out", str(tmp_path / "norm")]) == 0
        runs = {}
        for precision in ("bf16", "fp32"):
            out = tmp_path / precision
            assert main(["train", *common, "--set", f"precision={precision}", "--set", "stage2.iters=6",
                         "--norm", str(tmp_path / "norm" / "norm.safetensors"), "--out", str(out)]) == 0
            runs[precision] = json.loads((out / "losses.json").read_text())
    finally:
        torch.set_num_threads(before)
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert len(bf16["loss"]) == 6 and all(math.isfinite(v) for v in bf16["loss"]), bf16["loss"]
    assert all(math.isfinite(v) for v in bf16["per_target"]["proxy"])
    assert bf16["loss"] != fp32["loss"], "precision=bf16 trained exactly like fp32: autocast never ran"
    assert bf16["loss"][0] == pytest.approx(fp32["loss"][0], rel=5e-2)
    assert min(bf16["loss"][-2:]) < bf16["loss"][0], f"bf16 training did not lower the loss: {bf16['loss']}"
