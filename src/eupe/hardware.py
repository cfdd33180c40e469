"""What this machine's CPU computes natively: does it have bf16 instructions (AVX512-BF16 or AMX)?

``precision: auto`` runs bf16 autocast on a CPU only when it does: there, oneDNN runs bf16 matmuls on the
bf16 units (AMX tiles: several times the fp32 rate); elsewhere bf16 is emulated (converted to fp32 and back),
slower than fp32 itself. The decision and the evidence it rests on go into the log and into training's
``result.json`` (``metrics.hardware``).

Evidence, in order: the ``flags`` line of ``/proc/cpuinfo`` (Linux: ``amx_bf16``, ``avx512_bf16``), else
PyTorch's own cpuinfo probes (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``). Also
recorded, not deciding: PyTorch's dispatch capability (``AVX512``, ``AVX2``, ...) and whether oneDNN accepts
bf16 at all (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: true on any AVX512 CPU, emulated or not).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass

import torch

NATIVE_FLAGS = ("amx_bf16", "avx512_bf16")  # the first one present is named as the evidence
CPUINFO = "/proc/cpuinfo"


@dataclass(frozen=True)
class CpuBf16:
    model: str  # "Intel(R) Xeon(R) Platinum 8480+", or platform.processor()
    native_bf16: bool
    evidence: str  # "amx_bf16 (/proc/cpuinfo)", "no amx_bf16/avx512_bf16 in /proc/cpuinfo", ...
    features: tuple[str, ...]  # the native bf16 features found (NATIVE_FLAGS order)
    capability: str  # torch.backends.cpu.get_cpu_capability()
    onednn_bf16: bool | None  # oneDNN takes bf16 (natively or emulated); None: unknown

    def as_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d


def _read_cpuinfo(path: str = CPUINFO) -> tuple[str | None, set[str] | None]:
    """(model name, flags) of the first processor in ``path``; None where it has no such line or no file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None, None
    model = flags = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key == "model name":
            model = value.strip()
        elif flags is None and key in ("flags", "features"):  # x86 | aarch64
            flags = set(value.split())
        if model is not None and flags is not None:
            break
    return model, flags


def _torch_probe(name: str) -> bool | None:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else None
    except (RuntimeError, AttributeError):
        return None


def _torch_features() -> tuple[list[str], bool]:
    """Native bf16 features by PyTorch's cpuinfo, and whether it could tell at all."""
    probes = {"amx_bf16": _torch_probe("_is_amx_tile_supported"), "avx512_bf16": _torch_probe("_is_avx512_bf16_supported")}
    return [f for f in NATIVE_FLAGS if probes[f]], any(v is not None for v in probes.values())


def detect(cpuinfo: str = CPUINFO) -> CpuBf16:
    """Examine this CPU (uncached; :func:`cpu_bf16` is the cached answer every caller uses)."""
    model, flags = _read_cpuinfo(cpuinfo)
    if flags is not None and (flags & {"avx512f", "avx2", "sse2"} or flags & set(NATIVE_FLAGS)):
        found = [f for f in NATIVE_FLAGS if f in flags]
        evidence = f"{found[0]} ({cpuinfo})" if found else f"no {'/'.join(NATIVE_FLAGS)} in {cpuinfo}"
    else:  # no /proc/cpuinfo (macOS, Windows) or not an x86 flags line: PyTorch's cpuinfo probes
        found, known = _torch_features()
        if found:
            evidence = f"{found[0]} (torch.cpu)"
        else:
            evidence = "no AMX/AVX512-BF16 (torch.cpu)" if known else "unknown (no /proc/cpuinfo, no torch.cpu probes)"
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = None
    return CpuBf16(model=model or platform.processor() or platform.machine() or "unknown", native_bf16=bool(found),
                   evidence=evidence, features=tuple(found), capability=torch.backends.cpu.get_cpu_capability(),
                   onednn_bf16=onednn)


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """This process's CPU, examined once."""
    return detect()
