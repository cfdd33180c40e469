"""ONNX Runtime's int8 without AMX, on a CPU that has it: the peer as it runs on every CPU without AMX.

ONNX Runtime's MLAS takes AMX-INT8 tiles for its int8 GEMMs when the CPU has them (Intel Xeon since Sapphire
Rapids) and the kernel lets the process use them: on Linux a process asks first, with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, and MLAS falls back to its AVX-512 VNNI kernels when
the answer is no. ExecuTorch 1.5.1's XNNPACK has no AMX kernel, and neither has any phone or AMD CPU. This
file runs one ONNX Runtime session in a child process whose seccomp filter answers that request with EPERM
(nothing else is filtered), so the ``ort_int8_noamx`` column of ``export_latency.py`` is ONNX Runtime on the
kernels a CPU without AMX gives it, timed in the same rounds as the other runners:

    python benchmarks/no_amx.py MODEL.onnx THREADS INPUT.npy   # reads "run" lines, answers each with ms

The child checks that the request is refused before it imports ONNX Runtime, and exits with a one-line error
where seccomp is not available (not Linux x86-64).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
import subprocess
import sys
from pathlib import Path

ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 0x1022, 0x1023, 18
NR_ARCH_PRCTL = 158  # x86-64
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06  # classic BPF: load word, jump if equal, return
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM
# seccomp_data: nr at offset 0, arch at 4, args[0] (low word) at 16
FILTER = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 0, 5, AUDIT_ARCH_X86_64),
          (LD_W_ABS, 0, 0, 0), (JEQ_K, 0, 3, NR_ARCH_PRCTL),
          (LD_W_ABS, 0, 0, 16), (JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
          (RET_K, 0, 0, RET_EPERM), (RET_K, 0, 0, RET_ALLOW)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def amx_permitted() -> bool:
    """Whether this process may use AMX tiles now (its permission already granted)."""
    mask = ctypes.c_ulong(0)
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(NR_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) == 0 and bool(
        mask.value & (1 << XFEATURE_XTILEDATA))


def deny_amx() -> None:
    """From now on this process and its threads are refused AMX; raises where that cannot be arranged."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise OSError(f"denying AMX needs Linux on x86-64, this is {sys.platform} {platform.machine()}")
    if amx_permitted():
        raise OSError("AMX is already permitted to this process: deny it before anything runs an AMX kernel")
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in FILTER))
    prog = _Fprog(len(FILTER), ctypes.cast(code, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused")
    if libc.syscall(NR_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
        raise OSError("the seccomp filter is in place, yet the AMX request was granted")


class Session:
    """A runner of ``path`` in a child process without AMX; calling it runs once and returns the child's ms."""

    remote = True

    def __init__(self, path: Path, threads: int, example, work: Path):
        import numpy as np

        npy, log = work / f"{Path(path).stem}_input.npy", work / f"{Path(path).stem}_noamx.log"
        np.save(npy, example.numpy())
        with open(log, "w") as err:  # a file, not a pipe nobody reads during the rounds (a full pipe blocks the child)
            self.proc = subprocess.Popen([sys.executable, __file__, str(path), str(threads), str(npy)], text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            self.proc.kill()
            self.proc.wait()
            last = (log.read_text().strip().splitlines() or ["exited before it was ready"])[-1]
            raise OSError(f"no_amx.py: {ready or last}")

    def __call__(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _serve(path: str, threads: int, npy: str) -> None:
    try:
        deny_amx()
    except OSError as e:
        print(f"cannot deny AMX: {e}", flush=True)
        raise SystemExit(1) from None
    import time

    import numpy as np

    from ort_peer import inference_session

    sess = inference_session(Path(path), threads)
    feed = {sess.get_inputs()[0].name: np.load(npy)}
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        sess.run(None, feed)
        print(f"{(time.perf_counter() - t) * 1e3:.6f}", flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
