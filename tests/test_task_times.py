"""`make demo`'s task table (tools/task_times.awk) reads Airflow's `states-for-dag-run -o plain` into each task's
wall seconds, with the map index of a mapped task, "-" for a task that never ran, and midnight crossed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
AWK = ["awk", "-f", str(TOOLS / "iso_seconds.awk"), "-f", str(TOOLS / "task_times.awk")]

PLAIN = """\
Providers with executors missing 'cli' section ...
dag_id        logical_date               task_id      state    start_date                        end_date                            map_index
eupe_retrain  2026-01-05T00:00:00+00:00  validate     success  2026-12-06T06:56:22.834648+00:00  2026-12-06T06:56:38.217762+00:00  -1
eupe_retrain  2026-01-05T00:00:00+00:00  teachers     success  2026-12-06T06:56:46.281304+00:00  2026-12-06T07:00:43.748852+00:00  -1
eupe_retrain  2026-01-05T00:00:00+00:00  export       success  2026-12-06T23:59:50.000000+00:00  2026-12-07T00:00:17.000000+00:00  1
eupe_retrain  2026-01-05T00:00:00+00:00  promote      upstream_failed  None                              None                                -1
"""


@pytest.mark.skipif(shutil.which("awk") is None, reason="no awk")
def test_each_task_gets_its_wall_seconds_and_the_total():
    out = subprocess.run(AWK, input=PLAIN, capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["task_id"] == ["state", "seconds"]
    assert rows["validate"] == ["success", "15.4"]
    assert rows["teachers"] == ["success", "237.5"]
    assert rows["export[1]"] == ["success", "27.0"]  # mapped, across midnight
    assert rows["promote"] == ["upstream_failed", "-"]  # never started
    assert rows["(all"] == ["tasks)", "279.9"]
    assert "Providers" not in out  # Airflow's warnings before the table are not rows
