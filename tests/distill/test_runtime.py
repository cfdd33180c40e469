"""Where a run executes: device choice, precision, autocast, single-process reductions."""

import pytest
import torch

from eupe.config import load_config
from eupe.distill.runtime import Runtime, pick_device, setup
from eupe.errors import EupeError


def _cfg(tmp_path, **fields):
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return load_config(path)


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", None), ("auto", None)])
def test_precision_on_the_cpu(tmp_path, precision, expected, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = setup(_cfg(tmp_path, device="cpu", precision=precision))
    assert rt.device == torch.device("cpu") and rt.amp_dtype is expected
    assert (rt.rank, rt.world_size, rt.is_main) == (0, 1, True)


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with Runtime(torch.device("cpu")).autocast():
        assert (a @ b).dtype == torch.float32


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(EupeError, match="config field 'device': cuda, but no CUDA device is visible"):
        pick_device(_cfg(tmp_path, device="cuda"))
    assert pick_device(_cfg(tmp_path, device="auto")) == torch.device("cpu")


def test_one_process_reductions_are_the_value_itself():
    rt = Runtime(torch.device("cpu"))
    assert rt.mean(2.5) == 2.5
    rt.agree(7, "anything")  # nothing to disagree with
    rt.barrier()
