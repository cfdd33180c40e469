"""Images/s of the training data path, before and after crop-while-decoding: read + decode + random-resized crop + flip.

Measured through the trainer's own loaders (``loader.step_loader`` over map-style sources, ``sources.stream_loader``
over ``.tar`` shards) on photo-like JPEGs (quality 90, 500x375 to 1024x768, landscape and portrait), from

    local folder    an image folder on this disk (``ImageFolder``)
    s3 folder       the same folder on an S3 API (``S3ImageFolder``: one GET per image)
    local shards    WebDataset ``.tar`` shards on this disk (``ShardStream``, streamed)
    s3 shards       the same shards on the S3 API (one streaming GET per shard)
    mix 90/10       ``Mixture`` of the local folder (90%) and the s3 folder (10%)

"before" is the previous path (``fast=False``: the whole image decoded, then cropped and resized as a tensor),
"after" the default one (``fast=True``: the crop drawn from the header's size, a JPEG decoded at 1/2, 1/4 or
1/8 scale when the crop keeps the output's resolution there, an upright RGB JPEG decoded straight into an array
whose crop is a view, resized on the tensor). Both run
in the same process, interleaved (before, after, after, before, ...) for ``--rounds`` rounds; the median
round is shown, and the ratio after / before. Sizes: 256 (default), 512, and "stage3": crops at 512 then
one antialiased resize per batch to a size drawn from the 256/384/512 pyramid (``targets.prepare``).
Workers 0 is the main process (one reader); there the CPU time of the process per image is shown too (all the
work is in it, so it moves less than wall time on a shared, loaded machine: 2000 / ms is what two free cores
would reach with two workers). The S3 API is a ``moto_server`` started here on a free loopback
port (the same helper as the tests), so "s3" is HTTP on loopback: it measures the client path, not a network.

First, ``--profile-rounds`` (default 3, 0: none) times each stage of one sample (read, header, crop parameters,
decode, crop, to tensor, resize, flip, collate) in CPU ms per image, one thread, over the local folder at 256 px,
for three paths: "before" (``fast=False``), "e3ac954" (crop while decoding, the box cut by Pillow and copied
out: the previous "after") and "after"; each staged output is checked against ``DistillImages``' bit for bit.

    .venv/bin/python benchmarks/data_throughput.py [--images 160] [--batch 16] [--workers 0 2] [--sizes 256]
        [--rounds 3] [--profile-rounds 3] [--json benchmarks/results/data_throughput.json]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import _free_port, _wait_until_up  # noqa: E402 - the tests' moto_server helpers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from args import non_negative, one_line_errors, output_file, positive  # noqa: E402

from eupe import storage  # noqa: E402
from eupe.data import decode as dec  # noqa: E402 - the profile times the decoder's stages one by one
from eupe.data import loader as ld  # noqa: E402
from eupe.data.folder import ImageFolder  # noqa: E402
from eupe.data.loader import StepBatchSampler, step_loader  # noqa: E402
from eupe.data.sources import Mixture, S3ImageFolder, ShardStream, stream_loader, write_shards  # noqa: E402
from eupe.data.synth import JPEG_QUALITY, render, sample_scene  # noqa: E402
from eupe.distill.targets import prepare  # noqa: E402

PYRAMID = (256, 384, 512)  # the paper's stage-3 resolutions
SIZES = ("256", "512", "stage3")
SOURCES = ("local folder", "s3 folder", "local shards", "s3 shards", "mix 90/10")  # the order of the table's rows
PHOTO_SIZES = ((500, 375), (640, 480), (800, 600), (1024, 768))  # width x height; portrait too
PATHS = {"before": False, "after": True}  # the loaders' ``fast``


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


def photos(out: Path, n: int, seed: int = 0, classes: int = 8) -> None:
    """``n`` photo-like JPEGs (a rendered scene plus sensor-like noise, quality 90) in class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
        if rng.random() < 0.25:
            w, h = h, w
        pixels, _, _ = render(sample_scene(rng, i % classes, num_classes=classes), h, w)
        pixels = np.clip(pixels + rng.normal(0.0, 4.0, pixels.shape), 0, 255).astype(np.uint8)
        folder = out / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def batches(source, size: int, batch: int, workers: int, n: int, fast: bool) -> Iterator[torch.Tensor]:
    if isinstance(source, ShardStream):
        loader = stream_loader(source, size, batch, workers, fast=fast)
    else:
        steps = -(-n // batch)
        loader = step_loader(source, size, StepBatchSampler(len(source), batch, batch, 0, steps), workers, fast=fast)
    for item in loader:
        yield item[0]


def measure(source, size: str, batch: int, workers: int, n: int, fast: bool) -> tuple[float, float | None]:
    """Images/s from the first batch to the ``n``-th image (worker start-up left out), and with 0 workers
    the CPU ms per image of this process (all the work: less sensitive than wall time to a loaded box)."""
    load = 512 if size == "stage3" else int(size)
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    rng = random.Random(0)
    it = batches(source, load, batch, workers, n, fast)
    first = next(it)
    t0, c0, done = time.perf_counter(), time.process_time(), 0
    for images in it:
        if size == "stage3":
            prepare(images, rng.choice(PYRAMID), mean, std)
        done += images.shape[0]
        if done + first.shape[0] >= n:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return done / wall, (1000 * cpu / done if workers == 0 else None)


STAGES = ("read file", "header", "crop params", "decode", "crop", "to tensor", "resize + antialias", "flip", "collate")
PROFILED = {  # path -> what it is
    "before": "fast=False: whole image decoded, pil_to_tensor, resized_crop on the tensor",
    "e3ac954": "crop while decoding, the box cut by Pillow and copied out (decode_crop, the previous 'after')",
    "after": "crop while decoding, an upright RGB JPEG decoded into an array, the box a view (decode_crop_pixels)",
}


class _Clock:
    """CPU ms per stage, summed (``time.process_time``: the work of this process only)."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(STAGES, 0.0)
        self.t = time.process_time()

    def lap(self, stage: str) -> None:
        t = time.process_time()
        self.ms[stage] += 1000 * (t - self.t)
        self.t = t


def _staged(path: str, folder: ImageFolder, i: int, seed: int, size: int, clock: _Clock) -> torch.Tensor:
    """Sample ``(i, seed)`` through ``path``'s steps, each timed: the library's own functions, in its order."""
    data = folder.read_bytes(i)
    clock.lap("read file")
    if path == "before":  # DistillImages.__getitem__ with fast=False
        im = dec._open(data, folder.uri(i), folder.max_pixels)
        clock.lap("header")
        image = dec._load_rgb(im, folder.uri(i))
        clock.lap("decode")
        img = TF.pil_to_tensor(image)
        clock.lap("to tensor")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, h, w = T.RandomResizedCrop.get_params(img, [0.35, 1.0], [3 / 4, 4 / 3])
            flip = bool(torch.rand(()) < 0.5)
        clock.lap("crop params")
        img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        clock.lap("resize + antialias")  # the crop is a view inside resized_crop
        out = TF.horizontal_flip(img) if flip else img
        clock.lap("flip")
        return out
    drawn: dict[str, bool] = {}

    def crop(height: int, width: int) -> tuple[int, int, int, int]:
        clock.lap("header")
        top, left, h, w, drawn["flip"] = ld.crop_params(seed, height, width)
        clock.lap("crop params")
        return top, left, h, w

    im, orientation, box, _ = dec._plan_crop(data, folder.uri(i), size, crop, folder.max_pixels, True)
    clock.lap("header")  # the rest of the header: the draft set up
    pixels = dec._decode_rgbx(im, data, folder.uri(i)) if path == "after" and orientation == 1 else None
    if pixels is not None:
        clock.lap("decode")
        left, top, right, bottom = box
        pixels = pixels[top:bottom, left:right]
        clock.lap("crop")
    else:
        rgb = dec._load_rgb(im, folder.uri(i))
        clock.lap("decode")
        pixels = np.asarray(rgb.crop(box))
        clock.lap("crop")  # the crop and the copy out of Pillow (np.asarray: tobytes)
    chw = ld._chw(pixels)
    clock.lap("to tensor")
    out = TF.resize(chw, [size, size], antialias=True)
    out = out[:3] if out.shape[0] == 4 else out
    clock.lap("resize + antialias")
    out = TF.horizontal_flip(out) if drawn["flip"] else out
    clock.lap("flip")
    return out


def profile(folder: ImageFolder, size: int, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """CPU ms per image of each stage of each path in ``PROFILED``, one thread, over every image of ``folder``:
    paths interleaved within each round (order reversed every other round), median over ``rounds``. The first
    round checks the staged outputs against the library's (``DistillImages``) bit for bit."""
    n = len(folder)
    seeds = [ld.sample_seed(0, p) for p in range(n)]
    samples: dict[str, list[dict[str, float]]] = {path: [] for path in PROFILED}
    for r in range(rounds):
        for path in (PROFILED if r % 2 == 0 else reversed(PROFILED)):
            clock, outs = _Clock(), []
            for i in range(n):
                outs.append(_staged(path, folder, i, seeds[i], size, clock))
                if len(outs) == batch or i == n - 1:
                    clock.t = time.process_time()
                    torch.stack(outs)
                    clock.lap("collate")
                    if r == 0:
                        for k, o in enumerate(outs):
                            j = i - len(outs) + 1 + k
                            ref = ld.DistillImages(folder, size, fast=path != "before")[(j, seeds[j])][0]
                            assert torch.equal(o, ref), (path, j)
                    outs = []
                    clock.t = time.process_time()
            samples[path].append({stage: ms / n for stage, ms in clock.ms.items()})
    return {path: {stage: statistics.median(s[stage] for s in samples[path]) for stage in STAGES}
            for path in PROFILED}


def print_profile(prof: dict[str, dict[str, float]], size: int, n: int, rounds: int) -> None:
    print(f"per-stage CPU ms per image at {size} px, one thread, {n} images, median of {rounds} interleaved rounds")
    paths = list(prof)
    print(f"{'stage':20s}" + "".join(f"{p:>10s}" for p in paths))
    for stage in STAGES:
        print(f"{stage:20s}" + "".join(f"{prof[p][stage]:10.3f}" for p in paths))
    totals = {p: sum(prof[p].values()) for p in paths}
    print(f"{'total':20s}" + "".join(f"{totals[p]:10.3f}" for p in paths))
    print(f"{'img/s, 2 free cores':20s}" + "".join(f"{2000 / totals[p]:10.0f}" for p in paths))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - no lscpu: the platform's name
        return platform.processor() or platform.machine()


@one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--images", type=positive, default=160, help="images per measurement")
    ap.add_argument("--batch", type=positive, default=16)
    ap.add_argument("--workers", type=non_negative, nargs="+", default=[0, 2], help="DataLoader workers to try")
    ap.add_argument("--sizes", nargs="+", default=["256"], choices=SIZES, help="output sizes to measure")
    ap.add_argument("--sources", nargs="+", default=None, choices=SOURCES, metavar="SOURCE",
                    help=f"sources to measure (default: all of {', '.join(repr(s) for s in SOURCES)})")
    ap.add_argument("--rounds", type=positive, default=3, help="interleaved before/after rounds (median shown)")
    ap.add_argument("--per-shard", type=positive, default=16)
    ap.add_argument("--profile-rounds", type=non_negative, default=3,
                    help="interleaved rounds of the per-stage CPU profile at 256 px over the local folder (0: none)")
    ap.add_argument("--json", type=output_file, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a data worker is one core; the rate per worker is what scales
    load_before = os.getloadavg()  # the machine's other work: wall rates and, less, CPU ms depend on it

    with tempfile.TemporaryDirectory(prefix="eupe-bench-") as tmp:
        work = Path(tmp)
        photos(work / "photos", args.images)
        write_shards(ImageFolder(work / "photos"), work / "shards", args.per_shard)
        prof = profile(ImageFolder(work / "photos"), 256, args.batch, args.profile_rounds) if args.profile_rounds else None
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
            assert list(sources) == list(SOURCES)
            rows = []
            for name, make in sources.items():
                if args.sources and name not in args.sources:
                    continue
                for size in args.sizes:
                    for workers in args.workers:
                        rates: dict[str, list[float]] = {path: [] for path in PATHS}
                        cpu: dict[str, list[float]] = {path: [] for path in PATHS}
                        for r in range(args.rounds):  # before, after | after, before | ...: drift hits both
                            for path in (PATHS if r % 2 == 0 else reversed(PATHS)):
                                rate, ms = measure(make(), size, args.batch, workers, args.images, PATHS[path])
                                rates[path].append(rate)
                                if ms is not None:
                                    cpu[path].append(ms)
                        before, after = (statistics.median(rates[p]) for p in PATHS)
                        cpu_ms = {p: statistics.median(cpu[p]) if cpu[p] else None for p in PATHS}
                        rows.append({"source": name, "size": size, "workers": workers, "before": before, "after": after,
                                     "ratio": after / before, "cpu_ms_before": cpu_ms["before"],
                                     "cpu_ms_after": cpu_ms["after"], "rounds_before": rates["before"],
                                     "rounds_after": rates["after"]})
                        print(f"  {name:12s} {size:6s} workers={workers}: before {before:7.1f}  after {after:7.1f} img/s"
                              f"  x{after / before:.2f}", file=sys.stderr, flush=True)

    machine = f"{cpu_model()}, {os.cpu_count()} CPUs"
    load = [round(v, 2) for v in (*load_before, *os.getloadavg())]  # 1/5/15-minute load before, then after
    date = datetime.date.today().isoformat()
    print(f"data throughput {date}: {args.images} JPEGs of 500x375 to 1024x768 (q{JPEG_QUALITY}), batch {args.batch}, "
          f"{machine}, torch threads 1, median of {args.rounds} interleaved rounds, load average {load[:3]} -> {load[3:]}")
    def ms(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    header = ("source", "size", "workers", "before img/s", "after img/s", "after/before", "CPU ms/img before",
              "after")
    table = [header] + [(r["source"], r["size"], str(r["workers"]), f"{r['before']:.1f}", f"{r['after']:.1f}",
                         f"{r['ratio']:.2f}x", ms(r["cpu_ms_before"]), ms(r["cpu_ms_after"])) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if prof:
        print()
        print_profile(prof, 256, args.images, args.profile_rounds)
    if args.json:
        record = {"date": date, "machine": machine, "load_average_before_after": load, "images": args.images,
                  "batch": args.batch, "rounds": args.rounds, "rows": rows}
        if prof:
            record["profile"] = {"size": 256, "rounds": args.profile_rounds, "paths": PROFILED,
                                 "cpu_ms_per_image": prof,
                                 "total_cpu_ms": {p: sum(v.values()) for p, v in prof.items()}}
        storage.write_json(str(args.json), record)


if __name__ == "__main__":
    main()
