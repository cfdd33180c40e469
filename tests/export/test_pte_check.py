"""``eupe latency --pte`` checks that the file is a whole ExecuTorch program before the runtime reads it:
garbage used to abort the process (exit 134). Run as the real ``eupe`` executable, in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from eupe.errors import EupeError
from eupe.export.latency import check_program
from eupe.export.lower import lower

EUPE = str(Path(sys.executable).parent / "eupe")


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten()).eval()
    return lower(model, torch.randn(1, 3, 32, 32)).program


def _latency(pte: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([EUPE, "latency", "--pte", str(pte), "--model", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_garbage_exits_2_with_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"\x10\x00\x00\x00\xe0\xff\xfe\x80" + bytes(range(256)) * 8)  # today: abort, exit 134
    proc = _latency(garbage, tmp_path / "out")
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    err = proc.stderr.strip().splitlines()[-1]
    assert err == (f"eupe: error: --pte {garbage}: not an ExecuTorch program (no ET.. identifier at byte 4, "
                   "found b'\\xe0\\xff\\xfe\\x80')"), err
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_whole_program_passes_the_check(tmp_path: Path, program: bytes) -> None:
    pte = tmp_path / "ok.pte"
    pte.write_bytes(program)
    check_program(pte, str(pte))
    assert program[4:8] == b"ET12" and program[8:12] == b"eh00"  # what the check reads, as this executorch writes it
    for data in (b"", b"1234", program[:4] + b"XX12" + program[8:]):
        pte.write_bytes(data)
        with pytest.raises(EupeError, match="not an ExecuTorch program"):
            check_program(pte, str(pte))
    pte.write_bytes(program[: len(program) // 2])
    with pytest.raises(EupeError, match=rf"--pte {pte}: truncated ExecuTorch program \({len(program) // 2} bytes, "
                                        rf"its header says {len(program)}\)"):
        check_program(pte, str(pte))
