"""Shared fixtures.

``s3_server`` runs a real ``moto_server`` process (S3 over HTTP on loopback) for the whole
session; nothing is mocked in-process, so the code under test talks to it exactly as it would
talk to S3 or MinIO: through boto3 and the standard AWS_* environment variables.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered HTTP, whatever the status
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout:.0f}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a real moto_server; AWS_* env vars point at it for the whole session."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():  # a missing server is a broken environment, not a reason to skip
        raise RuntimeError(f"moto_server not installed next to {sys.executable}: run `make test` to build .venv")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    logdir = tmp_path_factory.mktemp("moto")
    log = logdir / "moto_server.log"
    # Log to a file, never to an unread PIPE: moto logs every request and would block once
    # the pipe buffer fills.
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(port)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_until_up(endpoint, proc, log)
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                mp.delenv(var, raising=False)
            # Keep the developer's ~/.aws config and credentials out of the tests.
            mp.setenv("AWS_CONFIG_FILE", str(logdir / "no-config"))
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(logdir / "no-credentials"))
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, empty, uniquely named bucket on the session's moto_server."""
    name = f"eupe-test-{uuid.uuid4().hex[:16]}"
    _admin_client(s3_server).create_bucket(Bucket=name)
    yield name


@functools.lru_cache(maxsize=None)
def _admin_client(endpoint: str) -> Any:
    import boto3  # building a client loads botocore's S3 model (~0.2 s): do it once

    return boto3.session.Session().client("s3", endpoint_url=endpoint)


# --- tiny recipes: the paper's model families shrunk to run on a CPU in seconds -------------------

TINY_RECIPE = """
name: tiny
seed: 0
device: cpu
precision: fp32
data: {{root: {data}, num_workers: 0}}
teachers:
  - {{name: pecore, model: vit_pe_core_gigantic_patch14_448, img_size: 56, kwargs: {{embed_dim: 48, depth: 1, num_heads: 2}}}}
  - {{name: dinov3, model: vit_huge_plus_patch16_dinov3, img_size: 48, kwargs: {{embed_dim: 40, depth: 1, num_heads: 2}}}}
proxy: {{model: vit_pe_core_gigantic_patch14_448, img_size: 56, kwargs: {{embed_dim: 64, depth: 2, num_heads: 2}}}}
student: {{model: vit_t, img_size: 32, kwargs: {{embed_dim: 48, depth: 2, num_heads: 2}}}}
normalization: {{num_images: 32, batch_size: 16}}
validation: {{min_side: 32}}  # tiny images (48-80 px): the stage-2 student resolution
stage1: {{iters: 12, batch_size: 8, micro_batch_size: 4, lr: 2.0e-3, warmup_iters: 2, adapter_hidden: 32,
          resolutions: [56], checkpoint_every: 4, log_every: 4}}
stage2: {{iters: 12, batch_size: 8, micro_batch_size: 4, lr: 2.0e-3, warmup_iters: 2, adapter_hidden: 64,
          resolutions: [32], teacher_resolutions: [32], checkpoint_every: 4, log_every: 4}}
stage3: {{iters: 12, batch_size: 8, micro_batch_size: 4, lr: 1.0e-3, warmup_iters: 2, adapter_hidden: 64,
          resolutions: [32, 48, 64], teacher_resolutions: [32, 48, 64], checkpoint_every: 4, log_every: 4}}
"""


PIPELINE_FAST = """
eval: {probe_epochs: 2}
export: {resolutions: [32], int8: false}
latency: {runs: 3, warmup: 1}
"""  # whole-pipeline runs (local, Airflow, KFP, the UI): one export, few probe epochs and timed runs


# The tiny recipe with a teacher zoo (`eupe teachers train`): a semantic and a dense teacher, trained briefly, so
# that the whole graph runs the zoo's path (the teachers step, stage 1 loading them with --teachers, compare).
ZOO_TEACHERS = {"kwargs: {embed_dim: 48, depth: 1, num_heads: 2}}": "semantic",
                "kwargs: {embed_dim: 40, depth: 1, num_heads: 2}}": "dense"}
ZOO_ITERS = 40


def zoo_recipe(text: str) -> str:
    for kwargs, objective in ZOO_TEACHERS.items():
        assert kwargs in text, kwargs
        text = text.replace(kwargs, kwargs[:-1] + f", train: {{objective: {objective}, iters: {ZOO_ITERS}, "
                                                  "batch_size: 16, lr: 3.0e-3}}")
    return text


def pipeline_workspace(root: Path, zoo: bool = False) -> Path:
    """``root`` as a DVC repository (no git, a local-folder remote ``root/remote``) holding a tiny dense dataset
    ``root/data``; returns the tiny recipe for whole-pipeline runs, ``root/tiny.yaml`` (``zoo``: with trained
    teachers, :func:`zoo_recipe`)."""
    from eupe.data.synth import synthesize

    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = True\n    remote = local\n['remote \"local\"']\n    url = {root / 'remote'}\n")
    synthesize(root / "data", 64, size=(48, 80), seed=1, num_classes=4, dense=True)
    config = root / "tiny.yaml"
    text = TINY_RECIPE.format(data=root / "data") + PIPELINE_FAST
    config.write_text(zoo_recipe(text) if zoo else text)
    return config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic images of varied sizes in 4 classes (shared, read-only)."""
    from eupe.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(root, 64, size=(48, 80), seed=1, num_classes=4)
    return root


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_data: Path) -> Path:
    """A YAML recipe with heterogeneous tiny teachers (widths 48/40, patch 14/16, 56/48 px)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(data=tiny_data))
    return path
