"""``eupe data version`` / ``eupe data pull``: DVC versioning of a dataset or checkpoint directory.

``version`` runs ``dvc add`` (or ``dvc commit`` of an explicit ``--dvc-file``) then ``dvc push`` and
reports the directory's content hash (the ``md5`` of the ``.dvc`` file's output, ``<md5>.dir`` for a
folder). ``pull`` restores the directory from the remote. Both run the ``dvc`` executable of this
environment in the DVC repository that holds the path (the nearest parent with a ``.dvc/`` folder).
The repository's ``.dvc/config`` names the remotes: ``local`` (default, a folder) and ``s3``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from eupe import storage
from eupe.errors import EupeError

log = logging.getLogger(__name__)

__all__ = ["find_repo", "pull", "register", "run_dvc", "version"]


def _dvc_command() -> list[str]:
    """``dvc`` as :mod:`eupe.data.dvc_cli` runs it: the same command line, its ``.dvc`` files written atomically."""
    import importlib.util

    if importlib.util.find_spec("dvc") is None:
        raise EupeError(f"dvc not installed for {sys.executable}: pip install 'dvc[s3]'")
    return [sys.executable, "-m", "eupe.data.dvc_cli"]


def find_repo(path: Path) -> Path:
    """The DVC repository holding ``path``: its nearest parent with a ``.dvc/`` folder."""
    start = path.absolute()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise EupeError(f"{path} is not inside a DVC repository (no .dvc/ folder above it; run `dvc init`)")


def run_dvc(args: list[str], repo: Path, env: dict[str, str] | None = None) -> str:
    """Run ``dvc <args>`` in ``repo``; a failure is one line with DVC's own error."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    proc = subprocess.run([*_dvc_command(), *args], cwd=repo, capture_output=True, text=True, env=env)
    if proc.returncode:
        lines = [" ".join(line.split()) for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else f"exit code {proc.returncode}")
        hint = " (a .dvc file cannot live in a git-ignored folder: pass --dvc-file outside it)" if "git-ignored" in reason else ""
        raise EupeError(f"dvc {' '.join(args)} (in {repo}) failed: {reason}{hint}")
    return proc.stdout


def _dvc_file(target: Path, repo: Path, dvc_file: str | None) -> Path:
    f = Path(dvc_file).absolute() if dvc_file else target.absolute().with_name(target.name + ".dvc")
    if f.suffix != ".dvc":
        raise EupeError(f"--dvc-file must end with .dvc: {dvc_file}")
    if repo not in (f.parent, *f.parent.parents):
        raise EupeError(f"--dvc-file {f} is outside the DVC repository {repo}")
    return f


def _out_entry(f: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(f.read_text())["outs"][0]
    except (OSError, ValueError, yaml.YAMLError, KeyError, IndexError, TypeError) as e:  # ValueError: not UTF-8
        raise EupeError(f"{f}: not a DVC file with an output ({type(e).__name__})") from None


def standalone_repo(folder: str | Path, project: Path | None = None) -> Path:
    """A DVC repository without git at ``folder`` (created when missing) that shares the remotes and the
    cache of the ``project`` DVC repository (default: the one holding the working directory). It is how
    outputs in git-ignored folders, a run's checkpoints under ``artifacts/``, get a ``.dvc`` file: git would
    refuse one there, and a scheduled run commits nothing to git anyway. Callers hold :func:`repo_lock`."""
    root = Path(folder).absolute()
    config_file = root / ".dvc" / "config"
    if config_file.is_file() and b"[cache]" in config_file.read_bytes():  # set up (the config is written last)
        return root
    project = find_repo(Path.cwd() if project is None or "://" in str(project) else Path(project))
    from dvc.config import Config  # the project's merged config (config + config.local), local urls made absolute

    conf = Config(dvc_dir=str(project / ".dvc"))
    lines = ["[core]", "    no_scm = True"]
    if conf["core"].get("remote"):
        lines.append(f"    remote = {conf['core']['remote']}")
    lines += ["[cache]", f"    dir = {(project / '.dvc' / 'cache').absolute()}"]
    for name, options in conf["remote"].items():
        lines.append(f"['remote \"{name}\"']")
        lines += [f"    {key} = {options[key]}" for key in ("url", "endpointurl", "region") if options.get(key)]
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".dvc").is_dir():
        run_dvc(["init", "--no-scm"], root)
    storage.write_bytes(str(config_file), ("\n".join(lines) + "\n").encode())  # atomically
    log.info("data version: %s is a DVC repository (no git) with the remotes of %s", root, project)
    return root


def _s3_version(uri: str) -> dict[str, Any]:
    """An ``s3://`` output is identified by the digest of its listing (keys, sizes, ETags), not by DVC:
    DVC tracks local files (its external outputs are gone in DVC 3)."""
    from eupe.fingerprint import digest

    return {"hash": digest(uri), "size": None, "nfiles": None, "dvc_file": None, "path": uri, "remote": "s3-etags"}


def version(path: str | Path, remote: str | None = None, dvc_file: str | None = None,
            repo: str | Path | None = None, like: str | Path | None = None) -> dict[str, Any]:
    """Track ``path`` with DVC and push it; returns ``hash`` (md5), ``size``, ``nfiles`` and ``dvc_file``.
    ``repo``: track it in that folder's own DVC repository (:func:`standalone_repo`)."""
    if storage.is_s3(str(path)):
        return _s3_version(str(path))
    version_checks(path, dvc_file, repo)
    target = Path(path)
    if repo is not None:
        with repo_lock(repo):  # the mapped tasks of one run share the run folder's repository
            standalone_repo(repo, like)
            return _track(target, dvc_file, remote)
    return _track(target, dvc_file, remote)


def version_checks(path: str | Path, dvc_file: str | None = None, repo: str | Path | None = None) -> None:
    """What :func:`version` refuses before it runs DVC or creates a repository (the step runs it before its
    ``--out`` is touched)."""
    if storage.is_s3(str(path)):
        return
    for flag, value in (("--repo", repo), ("--dvc-file", dvc_file)):
        if value is not None and storage.is_s3(str(value)):
            raise EupeError(f"{flag} {value}: DVC tracks a local --path in a local repository, not in s3://")
    target = Path(path)
    if not target.exists():
        raise EupeError(f"--path: not found: {path}")
    if repo is None:
        _dvc_file(target, find_repo(target), dvc_file)
        return
    root = Path(repo).absolute()  # standalone_repo's root
    if root not in target.absolute().parents:
        raise EupeError(f"--path {path} is outside --repo {repo}")
    _dvc_file(target, root, dvc_file)


@contextmanager
def repo_lock(folder: str | Path) -> Iterator[None]:
    """One DVC command sequence at a time in ``folder`` (``dvc init``, ``commit`` and ``push`` of concurrent
    tasks would otherwise fail on DVC's own lock): an exclusive ``flock`` on ``<folder>/.eupe-dvc.lock``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / ".eupe-dvc.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


PUSH_PENDING = "eupe-push-pending"  # in .dvc/tmp/ while a push runs: found by the next run, the push was killed (or failed)


@contextmanager
def _dvc_session(repo: Path) -> Iterator[bool]:
    """Hold ``repo``'s lock for a sequence of DVC commands (:func:`repo_lock` on ``.dvc/tmp``) and first remove
    what a killed run of ours left there; no run of ours is alive while the lock is held, so all of it is stale:

    * a half-written ``.dvc`` file (:mod:`eupe.data.dvc_cli`), ``rwlock`` or marker under its temporary name;
    * our commands' entries in DVC's ``rwlock``: DVC treats an entry as live while its PID exists, and a
      restarted container reuses PIDs (a zombie's PID exists too), so ``dvc add`` would fail as "busy".

    Yields whether a push was interrupted (its marker is there)."""
    tmp = repo / ".dvc" / "tmp"
    with repo_lock(tmp):
        for p in tmp.iterdir():
            if storage.is_leftover(p.name):  # eupe.storage's temporary names: DVC's own never match
                p.unlink(missing_ok=True)
        rw = tmp / "rwlock"
        try:
            lock = json.loads(rw.read_text() or "{}")
            kept = {"write": {k: v for k, v in lock.get("write", {}).items() if not _ours(v)},
                    "read": {k: r for k, v in lock.get("read", {}).items() if (r := [i for i in v if not _ours(i)])}}
            if kept != {"write": lock.get("write", {}), "read": lock.get("read", {})}:
                storage.write_bytes(str(rw), json.dumps(kept).encode())
                log.info("removed a killed run's entries from %s", rw)
        except (OSError, ValueError, AttributeError):
            pass  # none, or not ours to mend: DVC reports it
        yield (tmp / PUSH_PENDING).exists()


def _ours(info: object) -> bool:
    return isinstance(info, dict) and "dvc_cli" in str(info.get("cmd", ""))


def _push(repo: Path, f: Path, remote: str | None, interrupted: bool) -> None:
    """``dvc push`` of ``f``. After a killed push, DVC's indexes may list part of what to push, or claim objects
    the remote lacks: they are dropped first (:func:`eupe.data.dvc_cli._drop_indexes`)."""
    marker = repo / ".dvc" / "tmp" / PUSH_PENDING
    storage.write_bytes(str(marker), b"")
    run_dvc(["push", str(f.relative_to(repo)), *(["--remote", remote] if remote else [])], repo,
            {"EUPE_DVC_DROP_INDEXES": "1"} if interrupted else None)
    marker.unlink()


def _track(target: Path, dvc_file: str | None, remote: str | None) -> dict[str, Any]:
    repo = find_repo(target)
    f = _dvc_file(target, repo, dvc_file)
    with _dvc_session(repo) as interrupted:
        if dvc_file:  # an output outside the .dvc file's folder, e.g. a checkpoint under a git-ignored artifacts/
            out_path = os.path.relpath(target.absolute(), f.parent)
            if not f.exists() or _out_entry(f).get("path") != out_path:
                # through storage: a .dvc file under the step's --out claims that folder first (eupe.step)
                storage.write_bytes(str(f), yaml.safe_dump({"outs": [{"path": out_path}]}, sort_keys=False).encode())
            run_dvc(["commit", "--force", str(f.relative_to(repo))], repo)
        else:
            run_dvc(["add", str(target.absolute().relative_to(repo))], repo)
        _push(repo, f, remote, interrupted)
    out = _out_entry(f)
    return {"hash": out["md5"], "size": out.get("size"), "nfiles": out.get("nfiles"), "dvc_file": str(f),
            "path": str(target), "remote": remote or "default"}


def pull_checks(path: str | Path, dvc_file: str | None = None) -> tuple[Path, Path]:
    """The repository and the ``.dvc`` file :func:`pull` restores ``path`` from, or the one line why not."""
    target = Path(path)
    repo = find_repo(target.parent if not target.exists() else target)
    f = _dvc_file(target, repo, dvc_file)
    if not f.is_file():
        raise EupeError(f"{f} not found: version {path} first (eupe data version --path {path})")
    return repo, f


def pull(path: str | Path, remote: str | None = None, dvc_file: str | None = None) -> dict[str, Any]:
    """Restore ``path`` from the remote (``dvc pull`` of its ``.dvc`` file); returns its hash."""
    target = Path(path)
    repo, f = pull_checks(path, dvc_file)
    with _dvc_session(repo):
        run_dvc(["pull", str(f.relative_to(repo)), *(["--remote", remote] if remote else [])], repo)
    out = _out_entry(f)
    return {"hash": out["md5"], "size": out.get("size"), "nfiles": out.get("nfiles"), "dvc_file": str(f),
            "path": str(target), "remote": remote or "default"}


# --------------------------------------------------------------------------- CLI


def _run(step: str, args: argparse.Namespace, action) -> None:
    """``action`` (dvc add + push, or pull), skipped when ``--out`` holds an ok result for the same folder
    content, remote and .dvc file."""
    from eupe.fingerprint import fingerprint
    from eupe.step import StepRun

    run = None
    if args.out:
        inputs = {"path": args.path} if step == "data-version" else {"dvc_file": args.dvc_file or f"{args.path}.dvc"}
        def check() -> None:  # what the action refuses, before --out (an earlier run's result) is touched
            if step == "data-version":
                version_checks(args.path, args.dvc_file, args.repo)
            else:
                pull_checks(args.path, args.dvc_file)

        run = StepRun(args.out, step, fingerprint(step, inputs, remote=args.remote, dvc_file=args.dvc_file,
                                                  repo=getattr(args, "repo", None)), check=check)
        if run.done:
            print(run.done["metrics"]["hash"])
            return
    extra = (args.repo, args.like) if step == "data-version" else ()  # a pull finds the repository holding --path
    info = action(args.path, args.remote, args.dvc_file, *extra)
    if run is not None:
        run.finish({k: info[k] for k in ("hash", "size", "nfiles", "remote")},
                   {"path": info["path"], "dvc_file": info["dvc_file"]})
    print(info["hash"])


def cmd_version(args: argparse.Namespace) -> None:
    _run("data-version", args, version)


def cmd_pull(args: argparse.Namespace) -> None:
    _run("data-pull", args, pull)


def register(data: argparse._SubParsersAction) -> None:
    """``eupe data version`` and ``eupe data pull``."""
    for name, func, text in (
        ("version", cmd_version, "dvc add + dvc push a dataset or checkpoint directory; prints its content hash"),
        ("pull", cmd_pull, "dvc pull a versioned directory from the remote; prints its content hash"),
    ):
        p = data.add_parser(name, help=text)
        p.add_argument("--path", required=True, help="directory (or file) inside a DVC repository, e.g. data")
        p.add_argument("--remote", help="DVC remote name (default: the repository's default remote)")
        p.add_argument("--dvc-file", help="where the .dvc file goes (default: <path>.dvc; needed when that is git-ignored)")
        if name == "version":
            p.add_argument("--repo", help="a folder that is (or becomes) a DVC repository without git, sharing "
                           "the remotes and cache of the working directory's: for paths in git-ignored folders")
            p.add_argument("--like", metavar="PATH", help="with --repo: share the remotes and cache of the DVC "
                           "repository holding PATH (default: the working directory's)")
        p.add_argument("--out", required=name == "version", help="folder for result.json")
        p.set_defaults(func=func)
