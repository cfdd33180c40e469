"""Kill every long step at seeded random points (SIGKILL: the node is gone; SIGTERM: Kubernetes' notice, then
SIGKILL after the grace period), restart it as an orchestrator does (training: ``--resume``) and check that the
last restart's outputs equal an uninterrupted run's (training: bit for bit), that every file under a final name
parses right after each kill, and that no byte beside ``--out`` or among the inputs is lost (issue 11, item 8).

Rerun at other points: ``EUPE_FAULT_SEED=12 .venv/bin/pytest tests/faults``; many more kills, with a table:
``benchmarks/faults.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

import harness

KILLS = {name: 2 for name in harness.STEPS} | {"train1": 3, "export": 1}  # alternating SIGKILL/SIGTERM, seeded; export: ~15 s a run


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> harness.Workspace:
    return harness.shared_workspace(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("step", harness.STEPS)
def test_killed_and_restarted_step_ends_as_an_uninterrupted_run(ws: harness.Workspace, step: str) -> None:
    rng, signals = harness.plan(harness.SEED, step, KILLS[step])
    report = harness.kill_and_restart(ws, step, signals, rng)
    print(f"{step}: {report.tried} kills ({', '.join(f'{k.signal}@{k.delay_s:.2f}s->{k.exit}' for k in report.kills)}),"
          f" {report.missed} after the end, {report.seconds}s")
    assert not report.failures(), "\n".join(report.failures())
    assert report.tried >= 1, f"no kill landed while {step} ran (all {report.missed} came after its end)"
    assert report.bytes_lost == 0
    if report.known:  # a deviation the trainer owes (it depends on where the seeded kills land): listed, not hidden
        pytest.xfail("; ".join(report.known))


def test_the_checks_see_a_partial_file(tmp_path: Path) -> None:
    """What the kill test relies on: a truncated file under a final name is caught, a temporary name is not."""
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.ones(64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "result.json").write_text('{"step": "x", "status": "o')
    (tmp_path / ".result.json.tmp-abcd1234").write_text('{"half')  # a writer's temporary name: allowed
    (tmp_path / "x.pte").write_bytes(b"\0\0\0\0ET12eh00" + (24).to_bytes(4, "little") + (1 << 20).to_bytes(8, "little")
                                     + bytes(16))
    objects = tmp_path / "files" / "md5" / "1b"
    objects.mkdir(parents=True)
    (objects / "548c90f8d8a4d27f28df5f0af92957").write_bytes(b"not its content")  # a DVC object: hashes to its name
    (objects / ".GtB_gm2cLecOZJC7XyckwQ.tmp").write_bytes(b"half")  # DVC's own temporary name: allowed
    found = harness.partial_files([tmp_path])
    assert sorted(Path(f.split(":")[0]).name for f in found) == ["548c90f8d8a4d27f28df5f0af92957", "cut.safetensors",
                                                                  "result.json", "x.pte"], found
    snap = harness.Snapshot.take([tmp_path])
    (tmp_path / "model.safetensors").write_bytes(data[:-1])
    assert snap.lost() == (len(data), [str(tmp_path / "model.safetensors")])
