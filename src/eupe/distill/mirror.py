"""Training into ``s3://``: the checkpoints of a run are written to a local working folder and mirrored.

The optimizer loop needs a local folder (checkpoints are written atomically with ``os.replace``), so a
training step whose ``--out`` is an ``s3://`` prefix works in ``<$EUPE_CACHE>/train/<digest of out>/rank<R>``
and, after every checkpoint, uploads it to ``<out>/checkpoints/step_<N>/`` (``_SUCCESS`` last), then
``<out>/checkpoints/latest.json``. A retried pod on another node (``--resume``) with an empty cache
downloads the checkpoint ``latest.json`` names and continues from it; the deliverables (encoder, losses,
curve) and ``result.json`` are published by the step's :class:`eupe.step.StepRun` as for any ``--out``.
Checkpoints older than the last ``keep`` are removed from the bucket as they are locally. Under FSDP every
rank other than 0 adds its optimizer shards (:meth:`CheckpointMirror.push_shards`) after rank 0 uploaded the
checkpoint and before rank 0 publishes ``latest.json``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from eupe import storage
from eupe.errors import EupeError

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
            self._upload_newer(ckpt_dir, None)
            return
        marker = storage.read_bytes(latest_uri)  # checkpoint.save's own latest.json, as push uploaded it
        data = storage.parse_json(marker, latest_uri)
        name = data.get("path") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name.startswith("step_") or Path(name).name != name or ".." in name:
            raise EupeError(f"{latest_uri}: not a checkpoint marker (its path must name a step_* folder)")
        local = checkpoint.latest(ckpt_dir)
        if local is not None and local.name >= name:
            self._upload_newer(ckpt_dir, name)
            return
        log.info("--resume: fetching %s/%s into %s", self.remote, name, ckpt_dir)
        storage.download_dir(f"{self.remote}/{name}", ckpt_dir / name)
        storage.write_bytes(str(ckpt_dir / LATEST), marker)

    def _upload_newer(self, ckpt_dir: Path, remote_name: str | None) -> None:
        """A local checkpoint newer than the bucket's (a kill cut its upload): upload it now, before training on."""
        from eupe.distill import checkpoint

        local = checkpoint.latest(ckpt_dir)
        if local is not None and (remote_name is None or local.name > remote_name):
            log.info("--resume: %s never reached %s: uploading it", local.name, self.remote)
            self.push(local, keep={p.name for p in ckpt_dir.glob("step_*")})

    def push_shards(self, staging: Path, step: int) -> None:
        """An FSDP rank other than 0: its optimizer shards (``checkpoint.optim_staging``) into the bucket's
        ``step_<N>/optim/``, before rank 0 publishes the checkpoint with its own shard and ``latest.json``."""
        import shutil

        from eupe.distill.checkpoint import OPTIM_DIR

        storage.publish_files(staging, f"{self.remote}/step_{step:08d}/{OPTIM_DIR}")  # adds; removes nothing
        shutil.rmtree(staging, ignore_errors=True)

    def push(self, checkpoint_dir: Path, keep: set[str]) -> None:
        """Upload one saved checkpoint, then the ``latest.json`` naming it, and drop the ones not kept."""
        self.upload(checkpoint_dir)
        self.publish(checkpoint_dir, keep)

    def upload(self, checkpoint_dir: Path) -> None:
        """The checkpoint's files (objects an earlier upload of the same step left are removed)."""
        storage.upload_dir(checkpoint_dir, self.uri(checkpoint_dir))

    def publish(self, checkpoint_dir: Path, keep: set[str]) -> None:
        """``latest.json`` naming the uploaded checkpoint, then the bucket's older checkpoints not kept go."""
        storage.write_bytes(f"{self.remote}/{LATEST}", (checkpoint_dir.parent / LATEST).read_bytes())
        for uri in storage.list_uris(self.remote):
            name = uri[len(self.remote) + 1:].split("/", 1)[0]
            if name.startswith("step_") and name not in keep:
                storage.delete(uri)
