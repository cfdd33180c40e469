"""Training into ``s3://``: the checkpoints of a run are written to a local working folder and mirrored.

The optimizer loop needs a local folder (checkpoints are written atomically with ``os.replace``), so a
training step whose ``--out`` is an ``s3://`` prefix works in ``<$EUPE_CACHE>/train/<digest of out>/rank<R>``
and, after every checkpoint, uploads it to ``<out>/checkpoints/step_<N>/`` (``_SUCCESS`` last), then
``<out>/checkpoints/latest.json``. A retried pod on another node (``--resume``) with an empty cache
downloads the checkpoint ``latest.json`` names and continues from it; the deliverables (encoder, losses,
curve) and ``result.json`` are published by the step's :class:`eupe.step.StepRun` as for any ``--out``.
Checkpoints older than the last ``keep`` are removed from the bucket as they are locally.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from eupe import storage

log = logging.getLogger(__name__)

LATEST = "latest.json"


class CheckpointMirror:
    def __init__(self, out: str, rank: int = 0):
        self.out = out.rstrip("/")
        key = hashlib.sha256(self.out.encode()).hexdigest()[:16]
        self.work = storage._cache_root(None) / "train" / key / f"rank{rank}"

    @property
    def remote(self) -> str:
        return f"{self.out}/checkpoints"

    def uri(self, checkpoint: Path) -> str:
        """Where the local ``checkpoint`` folder lives in the bucket."""
        return f"{self.remote}/{checkpoint.name}"

    def restore(self, ckpt_dir: Path) -> None:
        """Fetch the bucket's latest checkpoint into ``ckpt_dir`` unless the local one is as new."""
        from eupe.distill import checkpoint

        latest_uri = f"{self.remote}/{LATEST}"
        if not storage.exists(latest_uri):
            return
        marker = storage.read_bytes(latest_uri)  # checkpoint.save's own latest.json, as push uploaded it
        name = json.loads(marker)["path"]
        local = checkpoint.latest(ckpt_dir)
        if local is not None and local.name >= name:
            return
        log.info("--resume: fetching %s/%s into %s", self.remote, name, ckpt_dir)
        storage.download_dir(f"{self.remote}/{name}", ckpt_dir / name)
        storage.write_bytes(str(ckpt_dir / LATEST), marker)

    def push(self, checkpoint_dir: Path, keep: set[str]) -> None:
        """Upload one saved checkpoint, then the ``latest.json`` naming it, and drop the ones not kept."""
        storage.upload_dir(checkpoint_dir, self.uri(checkpoint_dir))
        storage.write_bytes(f"{self.remote}/{LATEST}", (checkpoint_dir.parent / LATEST).read_bytes())
        for uri in storage.list_uris(self.remote):
            name = uri[len(self.remote) + 1:].split("/", 1)[0]
            if name.startswith("step_") and name not in keep:
                storage.delete(uri)
