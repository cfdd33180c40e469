"""``--out s3://...`` writes to the bucket (a real moto_server) for the data steps too, never to a local
folder named ``s3:``; the step's claim and result.json work there as on disk."""

from __future__ import annotations

from pathlib import Path

from eupe import storage
from eupe.cli import main


def test_data_synth_and_scan_write_to_the_bucket(s3_bucket: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data, scan = f"s3://{s3_bucket}/datasets/synth", f"s3://{s3_bucket}/runs/r1/scan"
    assert main(["data", "synth", "--out", data, "--num-images", "8", "--size", "32", "--classes", "2"]) == 0
    assert storage.read_json(f"{data}/result.json")["step"] == "data-synth"
    assert len(storage.list_uris(data, [".jpg"])) == 8 and storage.exists(f"{data}/synth.json")
    assert not storage.exists(f"{data}/.eupe-step")
    written = {u: storage.s3_digest(u, 10) for u in storage.list_uris(data)}
    assert main(["data", "synth", "--out", data, "--num-images", "8", "--size", "32", "--classes", "2"]) == 0
    assert {u: storage.s3_digest(u, 10) for u in storage.list_uris(data)} == written  # up to date: nothing rewritten

    assert main(["data", "scan", "--data", data, "--out", scan]) == 0
    assert storage.read_result(scan)["artifacts"]["manifest"] == f"{scan}/manifest.parquet"
    assert list(tmp_path.iterdir()) == []  # no local "s3:" folder


def test_an_s3_out_holding_another_steps_output_is_refused(s3_bucket: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = f"s3://{s3_bucket}/datasets/synth"
    assert main(["data", "synth", "--out", data, "--num-images", "4", "--size", "32", "--classes", "2"]) == 0
    before = {u: storage.read_bytes(u) for u in storage.list_uris(data)}
    assert main(["data", "scan", "--data", data, "--out", data]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"eupe: error: --out {data} holds the output of step 'data-synth', not 'data-scan': "
                   "each step writes to a folder of its own")
    assert {u: storage.read_bytes(u) for u in storage.list_uris(data)} == before
    assert main(["data", "scan", "--data", data, "--out", f"s3://{s3_bucket}//tmp/x"]) == 2
    assert "malformed s3 URI" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
