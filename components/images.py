"""The project's container images, one setting for every engine: the Airflow pod operator's defaults
(``components.airflow_tasks.Settings``) and the KFP components' ``base_image`` (``components.kfp_pipeline``).

``EUPE_IMAGE`` overrides the image every step runs in (default :data:`DEFAULT_IMAGE`); ``EUPE_GPU_IMAGE`` the
image of the steps that ask for GPUs (default: empty, the same image). Read when called.
"""

from __future__ import annotations

import os

DEFAULT_IMAGE = "eupe:latest"


def image() -> str:
    return os.environ.get("EUPE_IMAGE") or DEFAULT_IMAGE


def gpu_image() -> str:
    """The GPU steps' own image, or "" (they run in :func:`image`)."""
    return os.environ.get("EUPE_GPU_IMAGE", "")


def for_step(gpus: int) -> str:
    """The image of a step that asks for ``gpus`` GPUs."""
    return (gpu_image() or image()) if gpus > 0 else image()
