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


def _native_bf16() -> bool:
    from eupe.hardware import cpu_bf16

    return cpu_bf16().native_bf16


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", None), ("auto", "native")])
def test_precision_on_the_cpu(tmp_path, precision, expected, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if expected == "native":  # auto: bf16 autocast where the CPU has native bf16 (AMX, AVX512-BF16), else fp32
        expected = torch.bfloat16 if _native_bf16() else None
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


class _TwoRanks:
    """``torch.distributed`` as two ranks would see it, for the reductions of one rank (a unit test of
    Runtime's arithmetic; the real gloo runs are tests/distill/test_training.py and test_resume_claims.py)."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, other):
        self.other, self.calls = other, []

    def all_reduce(self, t, op=None):
        self.calls.append(("all_reduce", op, t.dtype))
        other = torch.as_tensor(self.other, dtype=t.dtype)
        if op is None or op == torch.distributed.ReduceOp.SUM:
            t += other
        else:
            t.copy_(torch.maximum(t, other))

    def barrier(self):
        self.calls.append(("barrier",))


def test_mean_over_two_ranks_is_their_average_in_float64(monkeypatch):
    fake = _TwoRanks(other=[5.0])
    monkeypatch.setattr("eupe.distill.runtime.dist", fake)
    rt = Runtime(torch.device("cpu"), rank=0, world_size=2)
    assert rt.mean(1.0) == 3.0 and rt.mean(0.1) == pytest.approx(2.55, abs=1e-12)
    assert fake.calls[0] == ("all_reduce", None, torch.float64)


def test_agree_passes_when_ranks_agree_and_names_the_range_when_not(monkeypatch):
    rt = Runtime(torch.device("cpu"), rank=0, world_size=2)
    monkeypatch.setattr("eupe.distill.runtime.dist", _TwoRanks(other=[8, -8]))
    rt.agree(8, "the step to resume from")
    monkeypatch.setattr("eupe.distill.runtime.dist", _TwoRanks(other=[4, -4]))
    with pytest.raises(EupeError, match=r"^ranks disagree on the step to resume from \(4\.\.8\): every rank must "
                                        r"see the same --out$"):
        rt.agree(8, "the step to resume from")
    monkeypatch.setattr("eupe.distill.runtime.dist", _TwoRanks(other=[12, -12]))
    with pytest.raises(EupeError, match=r"\(8\.\.12\)"):
        rt.agree(8, "x")


def test_barrier_waits_only_with_several_ranks(monkeypatch):
    fake = _TwoRanks(other=[0])
    monkeypatch.setattr("eupe.distill.runtime.dist", fake)
    Runtime(torch.device("cpu")).barrier()
    assert fake.calls == []
    Runtime(torch.device("cpu"), world_size=2).barrier()
    assert fake.calls == [("barrier",)]


class _FakeGroup:
    def __init__(self, rank):
        self.rank, self.backend, self.initialized = rank, None, False

    def is_initialized(self):
        return self.initialized

    def init_process_group(self, backend):
        self.backend, self.initialized = backend, True

    def get_rank(self):
        return self.rank


def test_setup_under_torchrun_on_cpus_joins_gloo_and_shares_the_cores(tmp_path, monkeypatch):
    group, threads = _FakeGroup(rank=3), []
    monkeypatch.setattr("eupe.distill.runtime.dist", group)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    rt = setup(_cfg(tmp_path, device="cpu", precision="fp32"))
    assert (rt.rank, rt.world_size, rt.is_main, group.backend) == (3, 8, False, "gloo")
    assert threads == [4]  # 16 cores / 4 ranks on this node
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    threads.clear()
    group.initialized = False
    setup(_cfg(tmp_path, device="cpu"))
    assert threads == [2]  # without LOCAL_WORLD_SIZE: all 8 ranks on this node


def test_setup_on_gpus_joins_nccl_and_takes_bf16_where_supported(tmp_path, monkeypatch):
    group, devices = _FakeGroup(rank=1), []
    monkeypatch.setattr("eupe.distill.runtime.dist", group)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for supported, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        group.initialized = False
        rt = setup(_cfg(tmp_path, device="auto", precision="auto"))
        assert rt.device == torch.device("cuda:1") and rt.amp_dtype is expected and group.backend == "nccl"
    assert devices == [torch.device("cuda:1")] * 2
    assert setup(_cfg(tmp_path, device="auto", precision="fp32")).amp_dtype is None
    assert pick_device(_cfg(tmp_path, device="cpu")) == torch.device("cpu")  # cpu asked: no GPU taken


def test_pick_device_takes_the_local_ranks_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device(_cfg(tmp_path, device="auto")) == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device(_cfg(tmp_path, device="cuda")) == torch.device("cuda:3")


def test_autocast_uses_the_runs_device_type_and_dtype(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: seen.append((device_type, dtype)) or "ctx")
    assert Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16).autocast() == "ctx"
    assert seen == [("cpu", torch.bfloat16)]
