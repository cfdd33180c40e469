"""benchmarks/no_amx.py: the seccomp filter that gives export_latency.py its "ONNX Runtime without AMX" peer."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "no_amx.py"
pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the filter is for Linux on x86-64")


def _run(code: str) -> subprocess.CompletedProcess:
    prelude = (f"import importlib.util, ctypes\nspec = importlib.util.spec_from_file_location('no_amx', {str(BENCH)!r})\n"
               "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
               "libc = ctypes.CDLL(None, use_errno=True)\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60)


def test_the_filter_refuses_the_amx_request_and_nothing_else():
    out = _run("m.deny_amx()\n"
               "print(libc.syscall(m.NR_ARCH_PRCTL, m.ARCH_REQ_XCOMP_PERM, m.XFEATURE_XTILEDATA), ctypes.get_errno())\n"
               "mask = ctypes.c_ulong(0)\n"
               "print(libc.syscall(m.NR_ARCH_PRCTL, m.ARCH_GET_XCOMP_PERM, ctypes.byref(mask)), m.amx_permitted())\n"
               "import numpy; print(float(numpy.ones(4).sum()))\n")
    assert out.returncode == 0, out.stderr
    refused, query, after = out.stdout.split("\n")[:3]
    assert refused == "-1 1"  # EPERM
    assert query == "0 False"  # asking what is permitted still works, and AMX is not
    assert after == "4.0"  # the process goes on working


def test_without_the_filter_the_request_is_answered_by_the_kernel():
    """The control: the same request unfiltered is not EPERM (granted where the CPU has AMX, EINVAL or
    ENOSYS-like errors elsewhere), so the test above measures the filter, not the machine."""
    out = _run("r = libc.syscall(m.NR_ARCH_PRCTL, m.ARCH_REQ_XCOMP_PERM, m.XFEATURE_XTILEDATA)\n"
               "print(r, ctypes.get_errno() if r else 0)\n")
    assert out.returncode == 0, out.stderr
    r, err = out.stdout.split()
    assert not (r == "-1" and err == "1")


def test_a_process_that_already_has_amx_is_told_so():
    out = _run("r = libc.syscall(m.NR_ARCH_PRCTL, m.ARCH_REQ_XCOMP_PERM, m.XFEATURE_XTILEDATA)\n"
               "if r != 0: print('no amx here'); raise SystemExit(0)\n"
               "try:\n    m.deny_amx()\nexcept OSError as e:\n    print(e)\n")
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no amx here":
        pytest.skip("this CPU or kernel grants no AMX")
    assert "already permitted" in out.stdout
