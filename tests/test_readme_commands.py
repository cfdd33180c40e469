"""Every command the README documents is runnable as written: each ``eupe`` command line (also through
``torchrun -m eupe.cli``) parses with the real CLI parser, flags, choices and required arguments included;
each subcommand's ``--help`` exits 0; every ``make`` target it names exists; every repository file it names
exists. A renamed flag, a dropped subcommand or a moved config breaks this test instead of a reader."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from eupe.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REPO_DIRS = ("configs/", "helm/", "dags/", "components/", "benchmarks/", "tools/", "containers/", "docs/", "gx/",
             "dashboards/", "tests/")


def _blocks() -> list[str]:
    """Shell lines of the README's code blocks, continuation lines joined, comments dropped."""
    lines, inside, pending = [], False, ""
    for raw in README.read_text().splitlines():
        if raw.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + re.sub(r"(^|\s)#\s.*$", "", raw).strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line:
            lines.append(line)
    return lines


def _eupe_argv(line: str) -> list[str] | None:
    """The arguments after ``eupe`` (or ``-m eupe.cli``) of one documented shell line, else None."""
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the command
        words = words[1:]
    if words and (words[0] in ("eupe", ".venv/bin/eupe") or words[0].endswith("/bin/eupe")):
        return [w.strip("[]") for w in words[1:]]  # [--optional args] are run as given
    for i, w in enumerate(words):
        if w == "eupe.cli" and i and words[i - 1] == "-m":
            return [w.strip("[]") for w in words[i + 1:]]
    return None


def _commands() -> list[list[str]]:
    out = []
    for line in _blocks():
        argv = _eupe_argv(line)
        if argv is not None and argv and not argv[0].startswith("<"):
            out.append([a for a in argv if a not in ("&", "&&")])
    return out


COMMANDS = _commands()


def test_the_readme_documents_the_main_commands():
    documented = {a[0] for a in COMMANDS}
    assert {"data", "normalize", "train", "evaluate", "export", "latency", "promote", "plan"} <= documented


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:2]) for a in COMMANDS])
def test_each_documented_eupe_command_parses_as_written(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"README: `eupe {' '.join(argv)}` does not parse (exit {e.code})")
    assert callable(getattr(args, "func", None)) or getattr(args, "command", None), argv


def _subcommands(parser) -> list[list[str]]:
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append([name])
                found += [[name, *rest] for rest in _subcommands(sub)]
    return found


def test_every_subcommand_documented_in_the_readme_has_help(capsys):
    documented = {tuple(a[:2]) for a in COMMANDS} | {(a[0],) for a in COMMANDS}
    subs = [s for s in _subcommands(build_parser()) if tuple(s) in documented]
    assert subs
    for sub in subs:
        with pytest.raises(SystemExit) as e:
            main([*sub, "--help"])
        assert e.value.code == 0, sub
        assert "usage:" in capsys.readouterr().out


def test_the_installed_entry_point_prints_help():
    proc = subprocess.run([str(Path(sys.executable).parent / "eupe"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout, proc.stderr[-2000:]


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {m for line in _blocks() for m in re.findall(r"(?:^|\s)make\s+([a-z][\w-]*)", line)}
    named |= set(re.findall(r"`make ([a-z][\w-]*)`", README.read_text()))
    assert named and named <= targets, sorted(named - targets)


def test_every_repository_file_the_readme_names_exists():
    text = README.read_text()
    paths = {p.rstrip(".,:;)`") for p in re.findall(r"(?<![\w/.-])((?:%s)[\w./<>*-]*)" % "|".join(
        re.escape(d) for d in REPO_DIRS), text)}
    concrete = {p for p in paths if not re.search(r"[<>*]", p) and not p.endswith("/")}
    missing = sorted(p for p in concrete if not (ROOT / p).exists())
    assert concrete and not missing, missing
