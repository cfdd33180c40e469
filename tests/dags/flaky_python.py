#!/usr/bin/env python3
"""A stand-in for the project's interpreter (the ``eupe_python`` Variable) that crashes one step once.

``python -m components.task ... --step $FLAKY_STEP`` the first time: the real step runs until it has saved
a training checkpoint (``checkpoints/latest.json`` under its run folder), is killed with SIGKILL (a lost
node, an OOM kill) and this wrapper exits 1. Every other call is the real interpreter ($FLAKY_REAL_PYTHON).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

real, args = os.environ["FLAKY_REAL_PYTHON"], sys.argv[1:]
step = args[args.index("--step") + 1] if "--step" in args else None
marker = Path(os.environ["FLAKY_MARKER_DIR"]) / f"{step}.crashed"
if step != os.environ.get("FLAKY_STEP") or "--plan" in args or marker.exists():
    os.execv(real, [real, *args])

marker.write_text("killed once after its first checkpoint\n")
root = Path(args[args.index("--artifact-root") + 1])
proc = subprocess.Popen([real, *args])
deadline = time.monotonic() + 600
while proc.poll() is None and time.monotonic() < deadline:
    if any(root.glob(f"runs/*/*/{step}/checkpoints/latest.json")):
        proc.kill()
        proc.wait()
        print(f"flaky_python: killed {step} after its first checkpoint", flush=True)
        sys.exit(1)
    time.sleep(0.02)
print(f"flaky_python: {step} finished before a checkpoint was seen (exit {proc.returncode})", flush=True)
sys.exit(1)
