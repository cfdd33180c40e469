"""quiet_native_stderr drops the native cpuinfo chatter written to fd 2 and keeps every other line, in order."""

import subprocess
import sys

SCRIPT = r"""
import os, sys
from eupe.native_log import quiet_native_stderr
print("before", file=sys.stderr, flush=True)
with quiet_native_stderr():
    os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
    os.write(2, b"E native error that matters\n")
    print("python line", file=sys.stderr)
    os.write(2, b"[cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.\n")
print("after", file=sys.stderr, flush=True)
"""


def test_chatter_is_dropped_and_other_lines_kept_in_order():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["before", "E native error that matters", "python line", "after"]


def test_lines_can_be_kept_for_the_callers_error_and_their_cause_read():
    from eupe.native_log import native_cause, quiet_native_stderr

    held: list[bytes] = []
    with quiet_native_stderr(into=held):
        pass  # nothing native written in this process: nothing held
    assert held == [] and native_cause(held) == ""
    lines = [b"[cpuinfo_utils.cpp:71] ignored\n", b"[program.cpp:184] Verification failed; data may be corrupt\n"]
    assert native_cause(lines) == "Verification failed; data may be corrupt"
    assert native_cause([b"plain line\n", b"\n"]) == "plain line"
