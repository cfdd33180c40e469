"""``eupe plan``: the estimate of a step on fake tensors against the same step's real CPU memory, the search, the CLI.

Tolerance: the plan's peak (MemTracker on fake tensors) is within 10% of the real run's peak read from the CPU
allocator (profiler memory events; measured: 0.0-3% on these models, bf16 autocast with CUDA's lists).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eupe import cli
from eupe.config import load_config
from eupe.errors import EupeError
from eupe.plan.real import real_step
from eupe.plan.recommend import GIB, Planner, chain, parse_memory
from eupe.plan.step import OPTIONS, Measurement, run_step

TOLERANCE = 0.10

# Small enough for seconds, large enough that activations, not allocator noise, make the peak: two teachers of
# different families, patch sizes and widths, a 3-block proxy, a 4-block student, 16 images per micro-batch.
SMALL = """
name: small
seed: 0
device: cpu
precision: bf16
data: {root: /nonexistent}
teachers:
  - {name: pecore, model: vit_pe_core_gigantic_patch14_448, img_size: 112, kwargs: {embed_dim: 192, depth: 1, num_heads: 3}}
  - {name: dinov3, model: vit_huge_plus_patch16_dinov3, img_size: 96, kwargs: {embed_dim: 160, depth: 1, num_heads: 2}}
proxy: {model: vit_pe_core_gigantic_patch14_448, img_size: 112, kwargs: {embed_dim: 256, depth: 2, num_heads: 4}}
student: {model: vit_t, img_size: 96, kwargs: {embed_dim: 192, depth: 2, num_heads: 3}}
stage1: {iters: 10, batch_size: 32, micro_batch_size: 16, adapter_hidden: 256, resolutions: [112]}
stage2: {iters: 10, batch_size: 32, micro_batch_size: 16, adapter_hidden: 256, resolutions: [96], teacher_resolutions: [96]}
stage3: {iters: 10, batch_size: 32, micro_batch_size: 16, adapter_hidden: 256, resolutions: [64, 96],
         teacher_resolutions: [64, 112]}
"""


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


@pytest.fixture
def one_thread():
    """The real step on one thread: on a shared CPU, OpenMP threads waiting on each other cost 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("stage", "label", "precision"), [(1, "ddp", "fp32"), (3, "ddp+ac", "bf16")])
def test_estimate_matches_real_cpu_peak(small: Path, stage: int, label: str, precision: str, one_thread) -> None:
    """Stage 1 (two teachers -> proxy) in fp32, stage 3 at its largest sizes with activation checkpointing in bf16
    autocast with CUDA's operator lists: the fake step's tracked peak is the real step's allocator peak within
    TOLERANCE (bf16 matmuls are slow on CPUs without bf16 units, hence fp32 for the larger stage)."""
    cfg = load_config(small, [f"precision={precision}"])
    option = next(o for o in OPTIONS if o.label == label)
    est = run_step(cfg, stage, option, 16, 1)
    real = real_step(cfg, stage, option, 16)
    err = (est.peak - real.peak) / real.peak
    print(f"stage {stage} {label}: plan {est.peak / 2**20:.2f} MiB, real {real.peak / 2**20:.2f} MiB, {err:+.2%}")
    assert abs(err) < TOLERANCE, (est, real)
    assert real.peak > 30 * 2**20  # activations dominate: not a test of allocator noise
    assert est.parts["frozen targets"] > 0 and est.parts["activations"] > 0 and est.parts["optimizer state"] > 0


def test_search_finds_the_largest_fitting_micro_batch() -> None:
    """Peaks linear in the micro-batch (as measured ones are): one ``distributed`` setting for every stage, the
    first in order of preference (ddp, fsdp, ddp+ac, fsdp+ac) under which each stage fits the minimum
    micro-batch, each stage at the largest divisor that fits, measured."""
    cost = {1: {"ddp": (50, 4.0), "fsdp": (10, 4.0), "ddp+ac": (50, 0.5), "fsdp+ac": (10, 0.5)},  # GiB, GiB/image
            2: {"ddp": (9, 0.1), "fsdp": (2, 0.1), "ddp+ac": (9, 0.03), "fsdp+ac": (2, 0.03)}}
    calls = []

    def measure(cfg, stage, option, mb, world):
        calls.append((stage, option.label, mb))
        a, b = cost[stage][option.label]
        return Measurement(stage, option.label, mb, world, int((a + b * mb) * GIB), {"activations": int(b * mb * GIB)})

    cfg = load_config(None)  # the paper's defaults: batch 8192, micro-batch 32
    planner = Planner(cfg, 8, 72 * GIB, min_micro_batch=8, measure=measure)
    plans = [planner.table(1), planner.table(2)]
    assert planner.recommend(plans) == "fsdp"  # ddp: stage 1 fits 5 images only
    assert plans[0].largest == {"ddp": 0, "fsdp": 8} and plans[0].choice.micro_batch == 8
    assert (1, "fsdp", 8) in calls and (1, "fsdp", 16) in calls  # measured: 8 fits (42 GiB), 16 does not (74)
    assert plans[1].choice.option == "fsdp" and plans[1].choice.micro_batch == 512  # 53 GiB; 1024 would be 104
    assert len(calls) <= 14  # 8 table steps and a few probes
    planner = Planner(cfg, 8, 72 * GIB, min_micro_batch=16, measure=measure)
    plans = [planner.table(1)]
    assert planner.recommend(plans) == "ddp+ac"  # fsdp at 16: 74 GiB; ddp+ac at 32: 66 GiB
    assert plans[0].largest == {"ddp": 0, "fsdp": 0, "ddp+ac": 32} and plans[0].choice.micro_batch == 32
    planner = Planner(cfg, 8, 8 * GIB, min_micro_batch=8, measure=measure)
    plans = [planner.table(1)]
    assert planner.recommend(plans) is None and plans[0].choice is None  # 10 GiB before the first image


def test_units_and_chain() -> None:
    assert parse_memory("80GiB") == 80 * GIB and parse_memory("80GB") == 80 * 10**9 and parse_memory("1024MiB") == GIB
    assert chain(1024) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] and chain(24) == [1, 2, 4, 8, 24]
    with pytest.raises(EupeError, match="--gpu-memory"):
        parse_memory("eighty")


def test_cli_prints_table_and_writes_json_png(tiny_config: Path, tmp_path: Path, capsys) -> None:
    """Two fake GPUs: ddp and FSDP2 on a fake process group, with and without checkpointing."""
    out = tmp_path / "plan"
    rc = cli.main(["plan", "--config", str(tiny_config), "--gpus", "2", "--gpu-memory", "1GiB", "--stage", "2",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "stage option" in printed and "fsdp+ac" in printed and "recommended" in printed
    doc = json.loads((out / "plan.json").read_text())
    table = doc["stages"]["2"]["table"]
    assert {m["option"] for m in table} == {"ddp", "ddp+ac", "fsdp", "fsdp+ac"} and doc["world_size"] == 2
    assert all(m["peak"] > 0 for m in table)
    assert doc["stages"]["2"]["recommended"]["peak"] <= doc["budget"]
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_impossible_gpu_memory_is_one_line(tiny_config: Path, tmp_path: Path, capsys) -> None:
    rc = cli.main(["plan", "--config", str(tiny_config), "--gpus", "2", "--gpu-memory", "1MiB", "--stage", "2",
                   "--out", str(tmp_path / "plan")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eupe:")]
    assert rc == 2
    assert len(errors) == 1 and errors[0].startswith("eupe: error: stage 2 does not fit 1 MiB per GPU"), errors
    assert not (tmp_path / "plan").exists()


def _gpu_step():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_step_peaks_and_mfu(tmp_path) -> None:
    """benchmarks/gpu_step.py: the published peak by device name (first match: PCIe before SXM, L40S before L4),
    MFU arithmetic, and its CPU run of the same code on tiny models (FLOPs counted, plan next to measured)."""
    g = _gpu_step()
    table = dict(g.PEAK_BF16_TFLOPS)
    pick = {name: next(v for k, v in g.PEAK_BF16_TFLOPS if k in name)
            for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
                         "NVIDIA L40S", "NVIDIA L4")}
    assert list(pick.values()) == [989.0, 756.0, 989.0, 312.0, 362.0, 121.0] and table["H100"] == 989.0
    assert g.mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5) and g.mfu(1e12, 1.0, None) is None
    out = tmp_path / "rows.json"  # the rows as written, not as captured from stdout (another test may own it)
    assert g.main(["--device", "cpu", "--tiny", "--no-compile", "--warmup", "0", "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == [2, 1] and all(r["tflop_per_step"] > 0 for r in rows)  # TFLOP per step
