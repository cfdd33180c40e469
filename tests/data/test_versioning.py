"""``eupe data version`` / ``eupe data pull``: real DVC against a local-folder remote."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from eupe import storage
from eupe.cli import main
from eupe.data.synth import synthesize


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh DVC repository (no git) with a local-folder default remote."""
    root = tmp_path / "repo"
    (root / ".dvc").mkdir(parents=True)  # what `dvc init --no-scm` + `dvc remote add -d` write (saves 2 dvc runs)
    (root / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = True\n    remote = local\n['remote \"local\"']\n    url = {tmp_path / 'remote'}\n")
    return root


def test_version_pushes_and_pull_restores_identical_bytes(repo, capsys):
    data = repo / "data"
    synthesize(data, 12, size=(24, 40), seed=3, num_classes=3)
    before = _digest(data)
    assert main(["data", "version", "--path", str(data), "--out", str(repo / "v1")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    out = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    assert printed == out["md5"] and printed.endswith(".dir") and out["nfiles"] == 14  # + synth.json, result.json
    result = storage.read_result(repo / "v1")  # artifact paths resolved (written relative to result.json)
    assert result["metrics"]["hash"] == printed and result["artifacts"]["dvc_file"] == str(repo / "data.dvc")

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")  # nothing local left: the bytes must come from the remote
    assert main(["data", "pull", "--path", str(data)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed
    assert _digest(data) == before

    (data / "circle" / "000000.jpg").write_bytes(b"changed")  # a new version gets a new hash
    assert main(["data", "version", "--path", str(data), "--out", str(repo / "v2")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] not in ("", printed)


def test_version_a_checkpoint_directory_with_its_own_dvc_file(repo, capsys):
    ckpt = repo / "artifacts" / "stage3" / "checkpoints" / "step_4"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\0" * 1000)
    (ckpt / "state.json").write_text("{}")
    target = ckpt.parent
    assert main(["data", "version", "--path", str(target), "--dvc-file", str(repo / "versions" / "stage3.dvc"),
                 "--out", str(repo / "v")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    out = yaml.safe_load((repo / "versions" / "stage3.dvc").read_text())["outs"][0]
    assert out["path"] == "../artifacts/stage3/checkpoints" and out["md5"] == printed and out["nfiles"] == 2
    shutil.rmtree(target)
    shutil.rmtree(repo / ".dvc" / "cache")
    assert main(["data", "pull", "--path", str(target), "--dvc-file", str(repo / "versions" / "stage3.dvc")]) == 0
    assert (ckpt / "model.safetensors").read_bytes() == b"\0" * 1000


def test_version_outside_a_dvc_repository_is_one_line_error(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["data", "version", "--path", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eupe: error: ") and "not inside a DVC repository" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, says", [
    (["--dvc-file", "elsewhere.yaml"], "--dvc-file must end with .dvc"),
    (["--repo", "{tmp}/other"], "is outside --repo"),
    (["--path", "{repo}/nope"], "input not found"),
], ids=["dvc-suffix", "outside-repo", "no-path"])
def test_bad_input_into_an_earlier_run_keeps_it_whole(repo, tmp_path, capsys, bad, says):
    """What `data version` refuses is checked before its --out is touched: the earlier run there stays complete."""
    data = repo / "d"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x" * 100)
    out = repo / "v"
    assert main(["data", "version", "--path", str(data), "--out", str(out)]) == 0
    before = _digest(out)
    capsys.readouterr()
    argv = dict(zip(["--path", "--out"], [str(data), str(out)]))
    argv.update({bad[0]: bad[1].format(tmp=tmp_path, repo=repo)})
    assert main(["data", "version", *[x for kv in argv.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eupe: error: ") and says in err and "\n" not in err
    assert _digest(out) == before and not (out / ".eupe-step").exists()


def test_pull_of_a_bad_dvc_file_into_an_earlier_run_keeps_it_whole(repo, capsys):
    data = repo / "d"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x" * 100)
    out = repo / "p"
    assert main(["data", "version", "--path", str(data), "--out", str(repo / "v")]) == 0
    assert main(["data", "pull", "--path", str(data), "--out", str(out)]) == 0
    before = _digest(out)
    (repo / "notes.txt").write_text("not a .dvc file")
    assert main(["data", "pull", "--path", str(data), "--dvc-file", str(repo / "notes.txt"), "--out", str(out)]) == 2
    assert "--dvc-file must end with .dvc" in capsys.readouterr().err
    assert _digest(out) == before


def test_push_to_a_missing_remote_names_it(repo, capsys):
    (repo / "d").mkdir()
    (repo / "d" / "f").write_text("x")
    assert main(["data", "version", "--path", str(repo / "d"), "--remote", "nope", "--out", str(repo / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "dvc push" in err and "nope" in err and "\n" not in err


def test_checkpoints_of_a_run_in_its_own_git_free_repository_concurrently(repo, tmp_path):
    """What version_checkpoints does: the run folder (git-ignored in a real checkout) becomes a DVC repository
    sharing the project's remote and cache; the mapped tasks of one run version their stages at the same time."""
    import subprocess
    import sys

    run = tmp_path / "artifacts" / "runs" / "p" / "r1"
    for stage in (1, 2, 3):
        ckpt = run / f"train_stage{stage}" / "checkpoints" / "step_4"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(bytes([stage]) * 1000)
    eupe = [sys.executable, "-m", "eupe.cli", "data", "version", "--repo", str(run), "--like", str(repo)]
    procs = [subprocess.Popen([*eupe, "--path", str(run / f"train_stage{s}" / "checkpoints" / "step_4"),
                               "--dvc-file", str(run / "version_checkpoints" / f"train_stage{s}" / "checkpoint.dvc"),
                               "--out", str(run / "version_checkpoints" / f"train_stage{s}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in (1, 2, 3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    hashes = [yaml.safe_load((run / "version_checkpoints" / f"train_stage{s}" / "result.json").read_text())
              ["metrics"]["hash"] for s in (1, 2, 3)]
    assert len(set(hashes)) == 3
    for h in hashes:  # pushed to the project's remote
        md5 = h.removesuffix(".dir")
        assert (tmp_path / "remote" / "files" / "md5" / md5[:2] / (md5[2:] + ".dir")).is_file()
    config = (run / ".dvc" / "config").read_text()
    assert "no_scm = True" in config and str(tmp_path / "remote") in config and "(default)" not in config


# --------------------------------------------------------------------------- what a killed run leaves (issue 11)


def test_a_dvc_file_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """eupe.data.dvc_cli: DVC's in-place rewrite of a .dvc file goes through a temporary file and a rename."""
    from eupe.data import dvc_cli

    dvc_cli.patch()  # raises if DVC's serializers stopped sharing _common._dump_data
    from dvc.utils.serialize import _yaml

    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # DVC runs in the repository's root: the temporary file goes to .dvc/tmp
    target = tmp_path / "data.dvc"
    target.write_text("outs:\n- md5: old.dir\n  path: data\n")

    def dies_midway(data, stream):
        stream.write("outs:\n- md5: ne")
        raise KeyboardInterrupt  # the signal lands while the file is half written

    with pytest.raises(KeyboardInterrupt):
        _yaml._dump_data(str(target), {"outs": []}, dumper=dies_midway)
    assert yaml.safe_load(target.read_text())["outs"][0]["md5"] == "old.dir"
    _yaml.dump_yaml(str(target), {"outs": [{"md5": "new.dir", "path": "data"}]})
    assert yaml.safe_load(target.read_text())["outs"][0]["md5"] == "new.dir"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["data.dvc"]


def test_version_after_a_kill_clears_our_stale_dvc_locks_and_temporaries(repo, capsys):
    """A killed `dvc add` leaves its entry in DVC's rwlock; DVC treats it as live while the PID exists (a zombie,
    or any process of a restarted container that got the PID): the next version must not fail as "busy"."""
    import json
    import os

    data = repo / "data"
    synthesize(data, 6, size=(24, 40), seed=3, num_classes=2)
    tmp = repo / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    ours = {"pid": os.getpid(), "cmd": "/venv/lib/python3.11/site-packages/eupe/data/dvc_cli.py add data"}
    theirs = {"pid": os.getpid(), "cmd": "dvc add elsewhere"}
    (tmp / "rwlock").write_text(json.dumps({"write": {str(data): ours, str(repo / "elsewhere"): theirs},
                                            "read": {str(data): [ours]}}))
    leftover = tmp / storage.temp_name("eupe-data.dvc", "tmp")
    leftover.write_text("outs:\n- md5: ha")
    assert main(["data", "version", "--path", str(data), "--out", str(repo / "v1")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(".dir")
    lock = json.loads((tmp / "rwlock").read_text())
    assert lock["write"] == {str(repo / "elsewhere"): theirs} and not lock.get("read")  # another tool's: DVC's to judge
    assert not leftover.exists() and not (tmp / "eupe-push-pending").exists()


def test_a_push_after_a_killed_one_does_not_trust_the_remote_index(repo, capsys):
    """A push killed while DVC cleared its remote index leaves file entries without their .dir; DVC then
    believes those files are on the remote and never pushes them. The next version drops the index."""
    from dvc.repo import Repo
    from dvc_data.hashfile.db import get_index

    data = repo / "data"
    synthesize(data, 6, size=(24, 40), seed=3, num_classes=2)
    assert main(["data", "version", "--path", str(data), "--out", str(repo / "v2")]) == 0
    digest = capsys.readouterr().out.strip().splitlines()[-1]
    remote = repo.parent / "remote"
    objects = sorted(p.relative_to(remote) for p in remote.rglob("*") if p.is_file())
    assert len(objects) == 9  # the .dir and its 8 files

    shutil.rmtree(remote)  # the killed clear: the remote lost its objects, the index its .dir entry only
    with Repo(str(repo)) as r:
        index = get_index(r.cloud.get_remote_odb("local"))
        del index.index[digest]
        index.close()
    assert main(["data", "version", "--path", str(data), "--out", str(repo / "v3")]) == 0  # no marker: DVC alone trusts the index
    left = sorted(p.relative_to(remote) for p in remote.rglob("*") if p.is_file())
    assert [o.suffix for o in left] == [".dir"]  # the .dir pushed, its 8 files believed there: DVC's failure

    shutil.rmtree(remote)
    with Repo(str(repo)) as r:
        index = get_index(r.cloud.get_remote_odb("local"))
        del index.index[digest]
        index.close()
    (repo / ".dvc" / "tmp" / "eupe-push-pending").write_bytes(b"")  # the killed push's marker
    assert main(["data", "version", "--path", str(data), "--out", str(repo / "v4")]) == 0
    assert sorted(p.relative_to(remote) for p in remote.rglob("*") if p.is_file()) == objects
