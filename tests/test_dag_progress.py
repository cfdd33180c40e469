"""`make demo`'s live view (tools/dag_progress.awk): Airflow's whole output goes to the log file unchanged, the
terminal gets each task's start, the step's progress lines and each task's end with its state and seconds, and
the filter exits with Airflow's status. The same filter on a real `airflow dags test` run, a retried task in it:
tests/dags/test_dags.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
AWK = ["-f", str(TOOLS / "iso_seconds.awk"), "-f", str(TOOLS / "dag_progress.awk")]
pytestmark = pytest.mark.skipif(shutil.which("awk") is None, reason="no awk")

LOG = """\
2026-12-06T23:58:50.067860Z [info     ] [DAG TEST] starting task_id=teachers map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1501
2026-12-06T23:59:48.344358Z [info     ] 2026-12-06 23:59:48,344 INFO eupe.progress: teacher pecore_g: 275/1000 step (27.5%) 9.14 step/s eta 1m19s loss=1.7340 [airflow.task.operators.components.airflow_tasks.EupeStepOperator] loc=airflow_tasks.py:235
2026-12-06T23:59:50.299332Z [info     ] Task instance state updated    [airflow.api_fastapi.execution_api.routes.task_instances] correlation_id=01a2 loc=task_instances.py:485 new_state=success rows_affected=1 ti_id=01a2
2026-12-06T23:59:50.329160Z [info     ] [DAG TEST] end task task_id=teachers map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1563
2026-12-06T23:59:51.000000Z [info     ] [DAG TEST] starting task_id=export map_index=1 [airflow.sdk.definitions.dag] loc=dag.py:1501
2026-12-07T00:00:17.500000Z [info     ] Task instance state updated    [airflow.api_fastapi.execution_api.routes.task_instances] new_state=failed rows_affected=1
2026-12-07T00:00:17.600000Z [info     ] [DAG TEST] end task task_id=export map_index=1 [airflow.sdk.definitions.dag] loc=dag.py:1563
"""


def _run(text: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "demo.log"
    proc = subprocess.run(["awk", "-v", f"logfile={log}", *AWK], input=text, capture_output=True, text=True)
    return proc, log


def test_tasks_and_progress_on_the_terminal_everything_in_the_log(tmp_path: Path) -> None:
    proc, log = _run(LOG + "eupe-dag-exit 0\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[23:58:50] teachers ...",
        "[23:59:48]   teacher pecore_g: 275/1000 step (27.5%) 9.14 step/s eta 1m19s loss=1.7340",
        "[23:59:50] teachers: success in 60.3 s",
        "[23:59:51] export[1] ...",
        "[00:00:17] export[1]: failed in 26.6 s",  # a mapped task, across midnight
    ]
    assert log.read_text() == LOG  # every line, and not the exit marker


@pytest.mark.parametrize(("tail", "status"), [("eupe-dag-exit 1\n", 1), ("eupe-dag-exit 3\n", 3), ("", 1)])
def test_exits_with_airflows_status_or_1_when_airflow_was_killed(tmp_path: Path, tail: str, status: int) -> None:
    proc, log = _run(LOG + tail, tmp_path)
    assert proc.returncode == status
    assert log.read_text() == LOG
