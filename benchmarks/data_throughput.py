"""Images/s of the training data path: read + decode + random-resized crop + flip (+ the stage-3 resize).

Measured through the trainer's own loaders (``loader.step_loader`` over map-style sources, ``sources.stream_loader``
over ``.tar`` shards) on synthetic photo-sized JPEGs (``--size`` px, 384-640 by default), from

    local folder    an image folder on this disk (``ImageFolder``)
    s3 folder       the same folder on an S3 API (``S3ImageFolder``: one GET per image)
    local shards    WebDataset ``.tar`` shards on this disk (``ShardStream``, streamed)
    s3 shards       the same shards on the S3 API (one streaming GET per shard)
    mix 90/10       ``Mixture`` of the local folder (90%) and the s3 folder (10%)

at output size 256, 512 and "stage3": crops at 512 (the largest of the 256/384/512 pyramid, as the trainer
loads them) then one antialiased resize per batch to a size drawn from the pyramid (``targets.prepare``).
Workers 0 is the main process (one reader); with ``--workers 2`` the rate is also shown per worker. The S3
API is a ``moto_server`` started here on a free loopback port (the same helper as the tests), so "s3" is
HTTP on loopback: it measures the client path, not a network.

    .venv/bin/python benchmarks/data_throughput.py [--images 96] [--batch 16] [--workers 0 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import _free_port, _wait_until_up  # noqa: E402 - the tests' moto_server helpers

from eupe import storage  # noqa: E402
from eupe.data.folder import ImageFolder  # noqa: E402
from eupe.data.loader import StepBatchSampler, step_loader  # noqa: E402
from eupe.data.sources import Mixture, S3ImageFolder, ShardStream, stream_loader, write_shards  # noqa: E402
from eupe.data.synth import synthesize  # noqa: E402
from eupe.distill.targets import prepare  # noqa: E402

PYRAMID = (256, 384, 512)  # the paper's stage-3 resolutions
SIZES = ("256", "512", "stage3")


@contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = workdir / "moto_server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_until_up(endpoint, proc, log)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(workdir / "none"),
                          AWS_SHARED_CREDENTIALS_FILE=str(workdir / "none"))
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload(local: Path, bucket: str, prefix: str) -> str:
    import boto3

    s3 = boto3.client("s3")
    for p in sorted(f for f in local.rglob("*") if f.is_file()):
        s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def batches(source, size: int, batch: int, workers: int, n: int) -> Iterator[torch.Tensor]:
    if isinstance(source, ShardStream):
        loader = stream_loader(source, size, batch, workers)
    else:
        steps = -(-n // batch)
        loader = step_loader(source, size, StepBatchSampler(len(source), batch, batch, 0, steps), workers)
    for item in loader:
        yield item[0]


def measure(source, size: str, batch: int, workers: int, n: int) -> float:
    """Images/s from the first batch to the ``n``-th image (worker start-up left out)."""
    load = 512 if size == "stage3" else int(size)
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    rng = random.Random(0)
    it = batches(source, load, batch, workers, n)
    first = next(it)
    t0, done = time.perf_counter(), 0
    for images in it:
        if size == "stage3":
            prepare(images, rng.choice(PYRAMID), mean, std)
        done += images.shape[0]
        if done + first.shape[0] >= n:
            break
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96, help="images per measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=[384, 640], metavar=("MIN", "MAX"), help="source image sides")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to try")
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a data worker is one core; the rate per worker is what scales

    with tempfile.TemporaryDirectory(prefix="eupe-bench-") as tmp:
        work = Path(tmp)
        synthesize(work / "photos", args.images, size=tuple(args.size), seed=0, num_classes=8)
        write_shards(ImageFolder(work / "photos"), work / "shards", args.per_shard)
        with moto_server(work):
            import boto3

            boto3.client("s3").create_bucket(Bucket="eupe-bench")
            s3_folder = upload(work / "photos", "eupe-bench", "photos")
            s3_shards = upload(work / "shards", "eupe-bench", "shards")
            local = ImageFolder(work / "photos")
            remote = S3ImageFolder(s3_folder)
            sources: dict[str, Callable[[], object]] = {
                "local folder": lambda: local,
                "s3 folder": lambda: remote,
                "local shards": lambda: ShardStream(sorted(str(p) for p in (work / "shards").glob("*.tar")), shuffle_buffer=64),
                "s3 shards": lambda: ShardStream([f"{s3_shards}/{p.name}" for p in sorted((work / "shards").glob("*.tar"))],
                                                 shuffle_buffer=64),
                "mix 90/10": lambda: Mixture([local, remote], [0.9, 0.1], ["local", "s3"]),
            }
            rows = []
            for name, make in sources.items():
                for size in SIZES:
                    for workers in args.workers:
                        rate = measure(make(), size, args.batch, workers, args.images)
                        rows.append({"source": name, "size": size, "workers": workers, "images_per_s": rate,
                                     "per_worker": rate / max(1, workers)})
                        print(f"  {name:12s} {size:6s} workers={workers}: {rate:7.1f} img/s", file=sys.stderr, flush=True)

    print(f"data throughput: {args.images} JPEGs of {args.size[0]}-{args.size[1]} px, batch {args.batch}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads 1")
    header = ("source", "size", "workers", "img/s", "img/s per worker")
    table = [header] + [(r["source"], r["size"], str(r["workers"]), f"{r['images_per_s']:.1f}", f"{r['per_worker']:.1f}")
                        for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        storage.write_json(str(args.json), rows)


if __name__ == "__main__":
    main()
