"""Logs fit for pods: no carriage-return bars when stderr is not a terminal, one line per interval instead."""

import subprocess
import sys

from eupe.progress import LogProgress


def test_a_step_in_a_pod_log_writes_plain_progress_lines(tiny_config, tmp_path):
    """`eupe train` with stderr to a file (as in a pod or an Airflow task): no '\\r', lines with count, rate, eta."""
    log = tmp_path / "train.log"
    from eupe.cli import main

    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--out", str(tmp_path / "n")]) == 0
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "eupe.cli", "train", "--config", str(tiny_config), "--stage", "1",
                               "--set", "stage1.iters=4", "--set", "stage1.warmup_iters=1", "--norm",
                               str(tmp_path / "n" / "norm.safetensors"), "--out", str(tmp_path / "t")],
                              stdout=f, stderr=f, env={**__import__("os").environ, "EUPE_PROGRESS_INTERVAL": "0"})
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "\r" not in text
    lines = [ln for ln in text.splitlines() if "eupe.progress: stage1:" in ln]
    assert len(lines) >= 4 and "4/4 step (100.0%)" in lines[-1] and "loss=" in lines[-1], lines
    assert any("eta " in ln for ln in lines[:-1]), lines
    # every step logs its resolved inputs and its output at the start
    (start,) = [ln for ln in text.splitlines() if "eupe.step: train-stage1:" in ln]
    assert f"norm={tmp_path / 'n' / 'norm.safetensors'}" in start and start.endswith(f"-> {tmp_path / 't'}"), start


def test_log_progress_counts_rate_and_eta(caplog):
    caplog.set_level("INFO", logger="eupe.progress")
    bar = LogProgress(total=10, desc="scan", unit="img", every=0)
    for _ in range(5):
        bar.update(1)
    bar.set_postfix(loss="0.5")
    bar.update(1)
    line = caplog.records[-1].getMessage()
    assert line.startswith("scan: 6/10 img (60.0%)") and "img/s" in line and "eta" in line and line.endswith("loss=0.5")
    assert list(LogProgress(range(3), desc="x", every=1e9)) == [0, 1, 2]  # iterates; the close line at the end
    assert caplog.records[-1].getMessage().startswith("x: 3/3 it (100.0%)")
