"""Plant each bug of the recipe audit (issue "Tests that catch a wrong recipe") in a copy of the code,
one at a time, run the tests that guard it, and report which ones the suite catches.

    .venv/bin/python tools/planted_bugs.py [--only ID ...]     # or: make planted

Every bug is a literal edit of one source line (``old`` -> ``new``); the copy (``src``, ``tests``,
``configs``, ``pyproject.toml``) lives in a temporary folder and is imported through ``PYTHONPATH``,
so the checkout is never touched. A clean copy is run first: its tests must pass, or nothing is
measured. Writes ``build/planted_bugs.json`` and ``build/planted_bugs.md``; exits 1 when a bug survives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


@dataclass(frozen=True)
class Bug:
    id: str
    what: str
    file: str  # under src/eupe/
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = [
    Bug("resample-no-transpose", "resample_tokens without its transpose (channels and positions scrambled)",
        "models/adapter.py", "x = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])",
        "x = tokens.reshape(b, d, grid[0], grid[1])", ("tests/models/test_adapter.py",)),
    Bug("resample-nearest", "resample_tokens nearest instead of bilinear",
        "models/adapter.py", 'mode="bilinear", align_corners=False)', 'mode="nearest")',
        ("tests/models/test_adapter.py",)),
    Bug("stats-times-std", "FeatureStats.apply multiplies patch features by std",
        "distill/normalize.py", "(patches.float() - self.patch_mean.to(dev)) / self.patch_std.to(dev)",
        "(patches.float() - self.patch_mean.to(dev)) * self.patch_std.to(dev)", ("tests/distill/test_normalize.py",)),
    Bug("stats-no-patch-std", "FeatureStats.apply drops the patch std",
        "distill/normalize.py", "(patches.float() - self.patch_mean.to(dev)) / self.patch_std.to(dev)",
        "(patches.float() - self.patch_mean.to(dev))", ("tests/distill/test_normalize.py",)),
    Bug("targets-unnormalized", "target_batch does not normalize",
        "distill/trainer.py", "normed = {name: stats[name].apply(f.cls, f.patches) for name, f in feats.items()}",
        "normed = {name: (f.cls, f.patches) for name, f in feats.items()}", ("tests/distill/test_step_functions.py",)),
    Bug("loss-weight-ignored", "a teacher's loss_weight ignored in student_loss",
        "distill/trainer.py", "sum(t.loss_weight * parts[t.name] for t in targets)", "sum(parts[t.name] for t in targets)",
        ("tests/distill/test_step_functions.py",)),
    Bug("constant-lr", "a constant learning rate instead of warm-up + cosine",
        "distill/trainer.py", "torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(st.iters, st.warmup_iters, st.min_lr_ratio))",
        "torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)", ("tests/distill/test_step_functions.py",)),
    Bug("no-grad-clip", "gradient clipping not applied",
        "distill/trainer.py", "grad_clip if grad_clip is not None else float(\"inf\")", "float(\"inf\")",
        ("tests/distill/test_step_functions.py",)),
    Bug("gate-fidelity-tol-0", "the gate reads every fidelity.* tolerance as 0",
        "evaluate/gate.py", "tol = tolerances.get(metric, 0.0)",
        "tol = 0.0 if metric == \"fidelity\" else tolerances.get(metric, 0.0)", ("tests/evaluate/test_gate.py",)),
    Bug("write-not-atomic", "atomic_write_local made non-atomic (copy + unlink)",
        "storage.py", "        os.replace(tmp, path)\n", "        shutil.copyfile(tmp, path)\n        os.unlink(tmp)\n",
        ("tests/test_storage.py",)),
    Bug("atomic-dir-rm-first", "atomic_dir removes the old folder before the rename",
        "storage.py", "        os.rename(final, old)\n", "        shutil.rmtree(final)\n        old = None\n",
        ("tests/test_storage.py",)),
    Bug("decode-16bit-256", "16-bit decode scaled by 256 instead of 257",
        "data/decode.py", "scaled = a.astype(np.float64) / 257.0", "scaled = a.astype(np.float64) / 256.0",
        ("tests/data/test_decode.py",)),
    Bug("decode-mode-I-clipped", "mode I clipped instead of scaled",
        "data/decode.py", "scaled = np.clip(a.astype(np.float64), 0, 65535) / 257.0", "scaled = np.clip(a.astype(np.float64), 0, 255)",
        ("tests/data/test_decode.py",)),
    Bug("norm-stage-unchecked", "the `--norm computed for another stage` refusal removed",
        "distill/trainer.py", 'if meta.get("stage", stage) != stage:', "if False:",
        ("tests/distill/test_train_inputs.py",)),
    Bug("ranks-not-agreeing", "ranks do not compare the step they resume from",
        "distill/trainer.py", '    rt.agree(start, "the step to resume from")\n', "",
        ("tests/distill/test_resume_claims.py",)),
    Bug("pickle-loaded", "a PyTorch state dict loaded with weights_only=False",
        "models/registry.py", 'torch.load(path, map_location="cpu", weights_only=True)',
        'torch.load(path, map_location="cpu", weights_only=False)', ("tests/models/test_registry.py",)),
    Bug("warmup-timed", "latency warm-up forwards timed with the runs",
        "export/runtime.py", "    for _ in range(warmup):\n        fn()\n    times = []\n    for _ in range(runs):",
        "    times = []\n    for _ in range(warmup + runs):", ("tests/export/test_latency.py",)),
    Bug("loss-in-bf16", "the distillation loss computed in the autocast dtype",
        "distill/loss.py", "s_cls, s_patch = student_cls.float(), student_patches.float()",
        "s_cls, s_patch = student_cls, student_patches", ("tests/distill/test_loss.py", "tests/distill/test_precision.py")),
    Bug("grid-padded", "a patch-14 target run at the asked size (timm pads it) instead of a whole number of patches",
        "models/features.py", "    return max(1, round(size / stride)) * stride", "    return size",
        ("tests/distill/test_recipe_integrity.py",)),
    Bug("stats-weights-unchecked", "statistics of other target weights accepted",
        "distill/normalize.py", 'if want.get("weights") != have["weights"]:', "if False:",
        ("tests/distill/test_recipe_integrity.py",)),
    Bug("stage3-random-student", "stage 3 without --init trains a random student",
        "distill/targets.py", "if stage == 3 and init is None and not from_scratch:", "if False:",
        ("tests/distill/test_recipe_integrity.py",)),
    Bug("resume-other-stats", "--resume with another statistics file accepted",
        "distill/trainer.py", "if trained is not None and trained != norm_digest:", "if False:",
        ("tests/distill/test_recipe_integrity.py",)),
    Bug("crash-exit-2", "a crash reported as bad input (exit 2)",
        "cli.py", "    except EupeError as e:\n", "    except Exception as e:\n", ("tests/test_cli.py",)),
]


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("src", "tests", "configs"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - t0, "timed out"
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return proc.returncode, time.perf_counter() - t0, (failed[0] if failed else lines[-1] if lines else "")


def plant(bug: Bug, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"planted-{bug.id}-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        target = copy / "src" / "eupe" / bug.file
        text = target.read_text()
        if text.count(bug.old) != 1:
            return {"id": bug.id, "what": bug.what, "status": "stale", "detail": f"{bug.file}: the line to change "
                    f"occurs {text.count(bug.old)} times (the code moved: update tools/planted_bugs.py)"}
        target.write_text(text.replace(bug.old, bug.new))
        rc, wall, detail = _run_tests(copy, bug.tests, timeout)
    status = {0: "survived", 1: "caught", -1: "timeout"}.get(rc, f"error (pytest exit {rc})")
    return {"id": bug.id, "what": bug.what, "status": status, "tests": list(bug.tests), "wall_s": round(wall, 1),
            "detail": detail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="bug ids to plant (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per bug")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or b.id in args.only]
    unknown = set(args.only or []) - {b.id for b in BUGS}
    if unknown:
        print(f"planted_bugs: unknown bug ids {sorted(unknown)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="planted-clean-") as tmp:
        _copy_tree(Path(tmp))
        tests = tuple(sorted({t for b in bugs for t in b.tests}))
        rc, wall, detail = _run_tests(Path(tmp), tests, args.timeout * 2)
    if rc != 0:
        print(f"planted_bugs: the clean copy fails its own tests ({detail}); nothing measured", file=sys.stderr)
        return 2
    print(f"clean copy: {len(tests)} test files pass ({wall:.0f} s)")
    rows = []
    for i, bug in enumerate(bugs, 1):
        row = plant(bug, args.timeout)
        rows.append(row)
        print(f"[{i}/{len(bugs)}] {row['status']:>8}  {bug.id}: {row.get('detail', '')[:120]}", flush=True)
    caught = sum(r["status"] == "caught" for r in rows)
    BUILD.mkdir(exist_ok=True)
    (BUILD / "planted_bugs.json").write_text(json.dumps({"caught": caught, "total": len(rows), "bugs": rows}, indent=2))
    md = ["# Planted bugs", "", f"{caught} of {len(rows)} caught.", "", "| bug | status | tests | first failure |",
          "| --- | --- | --- | --- |"]
    md += [f"| {r['what']} | {r['status']} | {', '.join(r.get('tests', []))} | {r.get('detail', '').replace('|', '/')[:160]} |"
           for r in rows]
    (BUILD / "planted_bugs.md").write_text("\n".join(md) + "\n")
    print(f"{caught} of {len(rows)} planted bugs caught: build/planted_bugs.md")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
