"""Every hostile input of issue 11 exits 2 with exactly one ``eupe: error:`` line (no traceback) and writes
nothing: no file created or changed under the workspace, nothing at the absolute places a bad S3 key or tar
member names (real CLI, the S3 ones against a moto_server of this module's own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import harness

KNOWN: dict[str, str] = {}  # bad inputs that do not behave yet: the issue item that promised it, and what happens


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Moto]:
    ws = harness.shared_workspace(tmp_path_factory)
    server = harness.Moto(ws.logs)
    server.client().create_bucket(Bucket="hostile")
    yield server
    server.close()


@pytest.mark.parametrize("hostile", [
    pytest.param(h, id=h.name, marks=[pytest.mark.xfail(reason=KNOWN[h.name], strict=False)] if h.name in KNOWN else [])
    for h in harness.HOSTILE])
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(tmp_path_factory: pytest.TempPathFactory,
                                                              moto: harness.Moto, hostile: harness.Hostile) -> None:
    ws = harness.shared_workspace(tmp_path_factory)
    report = harness.run_hostile(ws, hostile, moto if hostile.s3 else None, "hostile")
    assert report.handled, f"{hostile.name} (issue 11 item {hostile.item}): {report.why}; last lines {report.lines}"
