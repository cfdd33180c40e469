"""Turn mutmut's results (``mutants/**/*.meta``) into ``build/mutation.json`` and ``build/mutation.md``.

    .venv/bin/python tools/mutation_report.py --globs       # the mutant names `make mutate` runs
    .venv/bin/python tools/mutation_report.py --wall-s 812  # after `mutmut run`: write the report

The scope (modules, and the functions of a module when only some are scored) is
``[tool.eupe.mutation]`` in pyproject.toml. Each survivor gets a stable key,
``<module>::<function>::<hash of the changed lines>`` (mutmut's own ``__mutmut_N`` numbers shift
when a function changes), under which ``tools/mutation_equivalent.yaml`` explains equivalent mutants.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.yaml"
SEP = "ǁ"  # mutmut's class separator in mangled names: xǁClassǁmethod
# mutmut's exit codes (mutmut.stats.status_by_exit_code, 3.8) folded into the three counts we report
KILLED = {1: "killed", 3: "killed", 37: "caught by type check", -11: "crashed"}
TIMEOUT = {36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -9: "timeout"}
SURVIVED = {0: "survived", 33: "no tests", 5: "no tests"}
INCOMPLETE = {None: "not checked", 2: "interrupted"}


def scope() -> tuple[list[str], dict[str, list[str]]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["eupe"]["mutation"]
    return cfg["modules"], cfg.get("functions", {})


def dotted(module: str) -> str:
    return "eupe." + module.removesuffix(".py").replace("/", ".")


def mangled(function: str) -> str:
    cls, _, name = function.rpartition(".")
    return f"x{SEP}{cls}{SEP}{name}" if cls else f"x_{name}"


def globs() -> list[str]:
    modules, functions = scope()
    out = []
    for m in modules:
        if functions.get(m):
            out += [f"{dotted(m)}.{mangled(f)}__mutmut_*" for f in functions[m]]
        else:
            out.append(f"{dotted(m)}.*")
    return out


def function_of(name: str) -> str:
    """``eupe.storage.x__fsync_dir__mutmut_3`` -> ``_fsync_dir``; ``...xǁRuntimeǁmean__mutmut_1`` -> ``Runtime.mean``."""
    m = name.rpartition(".")[2].partition("__mutmut_")[0]
    if m.startswith(f"x{SEP}"):
        _, cls, meth = m.split(SEP)
        return f"{cls}.{meth}"
    return m.removeprefix("x_")


def definitions(source: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(source)
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f"{node.name}.{n.name}": n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))})
    return out


def mutant_functions(name: str, path: str) -> tuple[str, str]:
    """The original and the mutated function's code, as mutmut's ``show`` diffs them."""
    import libcst as cst
    from mutmut.mutation import diff_apply

    fns = diff_apply.read_functions_from_index(name, path)
    if fns is None:
        module = diff_apply.read_mutants_module(path)
        fns = diff_apply.read_original_function(module, name), diff_apply.read_mutant_function(module, name)
    return tuple(cst.Module([f]).code.strip() for f in fns)  # type: ignore[return-value]


def describe(name: str, path: str, defs: dict[str, ast.FunctionDef]) -> dict:
    import difflib

    function = function_of(name)
    orig, mutant = mutant_functions(name, path)
    diff = list(difflib.unified_diff(orig.split("\n"), mutant.split("\n"), path, path, lineterm="", n=1))
    changed = [d[0] + d[1:].strip() for d in diff[2:] if d[:1] in "+-"]
    key_hash = hashlib.sha1("\n".join(changed).encode()).hexdigest()[:10]
    # file line of the first changed line: the function's `def` line in the file, minus the lines
    # (comments) mutmut shows above it, plus the changed line's position in the function
    orig_lines = orig.split("\n")
    def_at = next((i for i, ln in enumerate(orig_lines) if re.match(r"\s*(async\s+)?def\s", ln)), 0)
    first = next((i for i, (a, b) in enumerate(zip(orig_lines, mutant.split("\n"))) if a != b), 0)
    line = defs[function].lineno - def_at + first if function in defs else None
    return {"id": name, "function": function, "line": line, "key_hash": key_hash, "diff": "\n".join(diff[2:])}


def module_report(module: str, selected: list[str], equivalent: dict[str, str]) -> dict:
    path = f"src/eupe/{module}"
    meta = ROOT / "mutants" / (path + ".meta")
    if not meta.exists():
        raise SystemExit(f"{meta.relative_to(ROOT)} missing: run `make mutate` (mutmut run) first")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    defs = definitions((ROOT / path).read_text())
    mine = {k: v for k, v in codes.items() if not selected or function_of(k) in selected}
    counts = {"killed": 0, "survived": 0, "timeout": 0, "total": len(mine)}
    survivors, incomplete, seen = [], [], {}
    for name, code in sorted(mine.items(), key=lambda kv: (function_of(kv[0]), int(kv[0].rpartition("_")[2]))):
        if code in INCOMPLETE:
            incomplete.append(name)
        elif code in KILLED:
            counts["killed"] += 1
        elif code in TIMEOUT:
            counts["timeout"] += 1
        else:
            counts["survived"] += 1
            s = describe(name, path, defs)
            base = f"{module}::{s['function']}::{s.pop('key_hash')}"
            seen[base] = seen.get(base, 0) + 1
            s["key"] = base if seen[base] == 1 else f"{base}#{seen[base]}"
            s["status"] = SURVIVED.get(code, f"suspicious (exit {code})")
            s["equivalent"] = equivalent.get(s["key"])
            survivors.append(s)
    if incomplete:
        raise SystemExit(f"{module}: {len(incomplete)} mutants not run to the end (e.g. {incomplete[0]}): run `make mutate` again")
    mutated = {function_of(k) for k in codes}
    not_mutated = {f: "decorated: " + ", ".join(f"@{ast.unparse(d)}" for d in defs[f].decorator_list)
                   if defs[f].decorator_list else "nothing to mutate"
                   for f in (selected or defs) if f in defs and f not in mutated
                   and (selected or defs[f].decorator_list)}
    missing = [f for f in selected if f not in defs]
    if missing:
        raise SystemExit(f"[tool.eupe.mutation.functions] {module}: no function {missing} in {path}")
    n_eq = sum(1 for s in survivors if s["equivalent"])
    return {**counts, "equivalent": n_eq, "score": round(counts["killed"] / counts["total"], 4) if counts["total"] else None,
            "functions": selected or "all", "not_mutated": not_mutated, "survivors": survivors}


def markdown(report: dict) -> str:
    t = report["total"]
    out = ["# Mutation testing", "",
           f"mutmut {report['tool_version']} over the core modules with the fast unit tests (`make mutate`), "
           f"{report['wall_s']:.0f} s wall. Score = killed / total: **{report['score']:.1%}** "
           f"({report['score_without_equivalent']:.1%} without the {t['equivalent']} equivalent mutants).", "",
           "| module | scope | killed | survived | timeout | total | equivalent | killed % |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, r in report["modules"].items():
        scope_ = "all" if r["functions"] == "all" else ", ".join(f"`{f}`" for f in r["functions"])
        pct = f"{r['score']:.1%}" if r["score"] is not None else "-"
        out.append(f"| {m} | {scope_} | {r['killed']} | {r['survived']} | {r['timeout']} | {r['total']} | {r['equivalent']} | {pct} |")
    out.append(f"| **total** | | {t['killed']} | {t['survived']} | {t['timeout']} | {t['total']} | {t['equivalent']} | {report['score']:.1%} |")
    skipped = [(m, f, why) for m, r in report["modules"].items() for f, why in r["not_mutated"].items()]
    if skipped:
        out += ["", "## Not mutated", "",
                "mutmut 3 mutates only the bodies of undecorated functions and methods (and `@staticmethod`/"
                "`@classmethod`); these in-scope functions got no mutant (their behaviour is pinned by tests all the same):", ""]
        out += [f"- `{m}` `{f}`: {why}" for m, f, why in skipped]
    survivors = [(m, s) for m, r in report["modules"].items() for s in r["survivors"]]
    live = [(m, s) for m, s in survivors if not s["equivalent"]]
    out += ["", f"## Survivors ({len(live)})", ""]
    for m, s in live:
        out += [f"### src/eupe/{m}:{s['line']} `{s['function']}` ({s['status']})", "",
                f"key `{s['key']}`, mutmut `{s['id']}`", "", "```diff", s["diff"], "```", ""]
    eq = [(m, s) for m, s in survivors if s["equivalent"]]
    out += ["", f"## Equivalent mutants ({len(eq)})", "",
            f"Explained in `{EQUIVALENT.relative_to(ROOT)}`: no test can tell them from the original code.", ""]
    for m, s in eq:
        out += [f"### src/eupe/{m}:{s['line']} `{s['function']}`", "", s["equivalent"].strip(), "",
                "```diff", s["diff"], "```", ""]
    return "\n".join(out).rstrip() + "\n"


def report(wall_s: float) -> dict:
    from importlib.metadata import version

    modules, functions = scope()
    equivalent = yaml.safe_load(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    per = {m: module_report(m, functions.get(m, []), equivalent or {}) for m in modules}
    total = {k: sum(r[k] for r in per.values()) for k in ("killed", "survived", "timeout", "total", "equivalent")}
    live = total["total"] - total["equivalent"]
    return {"tool": "mutmut", "tool_version": version("mutmut"), "modules": per, "total": total,
            "score": round(total["killed"] / total["total"], 4) if total["total"] else 0.0,
            "score_without_equivalent": round(total["killed"] / live, 4) if live else 0.0,
            "wall_s": round(wall_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--globs", action="store_true", help="print the mutant name patterns to pass to `mutmut run`")
    ap.add_argument("--wall-s", type=float, default=0.0, help="wall time of the mutmut run, for the report")
    ap.add_argument("--out", type=Path, default=ROOT / "build")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # mutmut's files are relative: mutants/src/...
    if args.globs:
        print("\n".join(globs()))
        return 0
    rep = report(args.wall_s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.json").write_text(json.dumps(rep, indent=2) + "\n")
    (args.out / "mutation.md").write_text(markdown(rep))
    t = rep["total"]
    print(f"mutation score {rep['score']:.1%}: {t['killed']} killed, {t['survived']} survived, {t['timeout']} timeout "
          f"of {t['total']} ({t['equivalent']} equivalent) -> {args.out / 'mutation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
