"""Where training images come from: image folders and WebDataset ``.tar`` shards, on local disk or
under ``s3://``, and weighted mixtures of them (the paper's best: 90% LVD + 10% IN-1k).

Two kinds of source:

* **map-style** (random access, :class:`~eupe.data.folder.ImageSource`): a local ``ImageFolder``,
  an :class:`S3ImageFolder` and a :class:`Mixture` of them. The trainer's ``StepBatchSampler``
  indexes them, so the data seen at a step stays a pure function of ``(seed, step)``.
* **streams** (:class:`ImageStream`, a torch ``IterableDataset``): :class:`ShardStream` reads
  ``.tar`` shards sequentially in constant memory (``tarfile`` in stream mode over the file or over
  boto3's streaming body); shard ``i`` goes to reader ``i % (world_size * num_workers)`` (reader =
  ``rank * num_workers + worker``), so every sample is read exactly once per epoch across all
  ranks and workers; a seeded shuffle buffer mixes samples within a reader. :class:`MixedStream`
  mixes streams by weight, drawing the source of each sample from a generator seeded by
  ``(seed, reader)``.

Every image is decoded by :func:`eupe.data.decode.decode` with the pixel limit of the data's validation
(``validation.max_pixels``, given to :func:`open_data`). A file that does not decode is skipped and counted
(:func:`read_sample` for map-style sources; streams yield the count with the next sample), never a crash;
an S3 object that cannot be *read* is a one-line :class:`EupeError` naming it.

Hostile shards cost bounded memory and time (:func:`read_shard`): a member is read whole only up to
:data:`~eupe.data.decode.MAX_IMAGE_BYTES`, a shard only up to :data:`MAX_SHARD_BYTES` decompressed, a tar
header only up to the member limit, and a member named outside the shard (absolute, or with ``..``) is never
read; each is skipped and counted like an undecodable image. The shuffle buffer holds at most
:data:`SHUFFLE_BUFFER_BYTES` of samples.
"""

from __future__ import annotations

import bisect
import bz2
import copy
import fnmatch
import glob
import gzip
import io
import json
import logging
import lzma
import math
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from botocore.exceptions import BotoCoreError
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eupe import storage
from eupe.data.decode import DEFAULT_MAX_PIXELS, MAX_IMAGE_BYTES, UndecodableImage, decode, too_large
from eupe.data.folder import IMAGE_SUFFIXES, ImageFolder, ImageSource, class_labels, is_image
from eupe.errors import EupeError

if TYPE_CHECKING:
    from eupe.config import DataConfig

__all__ = [
    "MAX_CONSECUTIVE_UNDECODABLE",
    "MAX_SHARD_BYTES",
    "SHARD_SUFFIX",
    "SHUFFLE_BUFFER_BYTES",
    "Augment",
    "ImageStream",
    "IndexStream",
    "MixedStream",
    "Mixture",
    "Record",
    "S3ImageFolder",
    "ShardStream",
    "iter_records",
    "open_data",
    "open_uri",
    "read_sample",
    "read_shard",
    "stream_loader",
    "write_shards",
]

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
# Undecodable files in a row before a run gives up: a source that is mostly broken is a bad input.
MAX_CONSECUTIVE_UNDECODABLE = 100
MAX_SHARD_BYTES = 16 << 30  # decompressed bytes read from one .tar shard; the rest of a larger one is skipped
SHUFFLE_BUFFER_BYTES = 1 << 30  # a stream's shuffle buffer holds data.shuffle_buffer samples, at most this much
_GLOB_CHARS = "*?["


# --------------------------------------------------------------------------- map-style sources


class S3ImageFolder:
    """``s3://bucket/prefix/<class>/<file>`` (class folder optional): listed once, read per image."""

    def __init__(self, prefix: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root, self.max_pixels = prefix.rstrip("/"), max_pixels
        self.uris = [u for u in storage.list_uris(self.root) if is_image(u)]
        if not self.uris:
            raise EupeError(f"no images in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.classes, self.labels = class_labels([u[len(self.root) + 1 :].split("/") for u in self.uris])

    def __len__(self) -> int:
        return len(self.uris)

    def uri(self, index: int) -> str:
        return self.uris[index]

    def label(self, index: int) -> int:
        return self.labels[index]

    def domain(self, index: int) -> str | None:
        return None

    def read_bytes(self, index: int) -> bytes:
        return storage.read_bytes(self.uris[index])  # EupeError "cannot read s3://...: NoSuchKey"

    def open(self, index: int) -> Image.Image:
        return decode(self.read_bytes(index), self.uris[index], self.max_pixels)


class Mixture:
    """A weighted mixture of map-style sources, itself a map-style source.

    The index space ``[0, n)`` is cut into one block per source, of size proportional to its weight,
    with ``n`` the smallest size at which every block covers its source at least once; index ``j`` of
    block ``k`` is image ``(j - start_k) % len_k`` of source ``k``. The sampler's seeded per-epoch
    permutation of ``[0, n)`` therefore picks the source of each sample position from ``(seed,
    position)`` alone, gives every source exactly its share of each epoch and every image of a
    source an equal number of draws (a small source is repeated, a large one is never truncated).
    Labels are remapped onto the union of the sources' class names.
    """

    def __init__(self, sources: Sequence[ImageSource], weights: Sequence[float],
                 domains: Sequence[str | None] | None = None):
        if not sources or len(sources) != len(weights):
            raise EupeError(f"a mixture needs one weight per source, got {len(sources)} sources and {len(weights)} weights")
        total = float(sum(weights))
        shares = [w / total for w in weights]
        n0 = max(math.ceil(len(s) / p) for s, p in zip(sources, shares))
        self.sizes = [max(len(s), round(n0 * p)) for s, p in zip(sources, shares)]
        self.starts = [0]
        for size in self.sizes:
            self.starts.append(self.starts[-1] + size)
        self.sources, self.shares = list(sources), shares
        self.domains = list(domains) if domains is not None else [None] * len(sources)
        self.classes = sorted({c for s in sources for c in s.classes})
        index = {c: i for i, c in enumerate(self.classes)}
        self._remap = [[index[c] for c in s.classes] for s in sources]

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(source number, image index in that source)`` of mixture index ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"mixture index {index} out of range [0, {len(self)})")
        k = bisect.bisect_right(self.starts, index) - 1
        return k, (index - self.starts[k]) % len(self.sources[k])

    def uri(self, index: int) -> str:
        k, i = self.locate(index)
        return self.sources[k].uri(i)

    def label(self, index: int) -> int:
        k, i = self.locate(index)
        label = self.sources[k].label(i)
        return self._remap[k][label] if label >= 0 else -1

    def domain(self, index: int) -> str | None:
        k, i = self.locate(index)
        return self.domains[k] or self.sources[k].domain(i)

    def read_bytes(self, index: int) -> bytes:
        k, i = self.locate(index)
        return self.sources[k].read_bytes(i)

    def open(self, index: int) -> Image.Image:
        k, i = self.locate(index)
        return self.sources[k].open(i)


def read_sample(source: ImageSource, index: int, limit: int = MAX_CONSECUTIVE_UNDECODABLE,
                open_image: Callable[[int], Any] | None = None) -> tuple[Any, int, int]:
    """Image ``index`` of ``source`` or, when it does not decode, the next one (cyclically) that does.

    Returns ``(image, label, skipped)``: the substitute depends on ``index`` only, so the data at a
    step stays a pure function of ``(seed, step)``; ``skipped`` counts the files passed over (each
    logged with its reason). More than ``limit`` in a row is an :class:`EupeError`. ``open_image(i)`` reads
    image ``i`` instead of ``source.open`` (the trainer's crop-while-decoding), raising the same errors.
    """
    n = len(source)
    read = open_image or source.open
    for skipped in range(min(limit, n - 1) + 1):
        i = (index + skipped) % n
        try:
            return read(i), source.label(i), skipped
        except UndecodableImage as e:
            log.warning("skipping undecodable image %s", e)
    raise EupeError(f"{source.uri(index)} and the next {min(limit, n - 1)} images do not decode: is the dataset broken?")


# --------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class Record:
    """One undecoded sample: where it came from, its bytes, and the label/domain its source knows.
    ``skipped``: why a sample was not read (too large, named outside its shard); counted, never decoded."""

    uri: str
    data: bytes
    label: int = -1
    domain: str | None = None
    skipped: str | None = None


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: ``dir/key.ext`` -> (``dir/key``, ``ext``); the key ends at the basename's first dot."""
    folder, slash, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return folder + slash + key, ext.lower()


def _record(shard: str, key: str, parts: dict[str, bytes]) -> Record | None:
    image_ext = next((ext for ext in parts if "." + ext in IMAGE_SUFFIXES), None)
    if image_ext is None:
        log.warning("shard %s: sample %r has no image (%s); ignored", shard, key, ", ".join(sorted(parts)) or "empty")
        return None
    uri = f"{shard}#{key}.{image_ext}"
    label, domain = -1, None
    try:
        if "json" in parts:
            meta = json.loads(parts["json"])
            label, domain = int(meta.get("label", -1)), meta.get("domain")
        if "cls" in parts:
            label = int(parts["cls"].decode().strip())
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise EupeError(f"{shard}#{key}: bad .cls/.json label: {' '.join(str(e).split())}") from None
    return Record(uri, parts[image_ext], label, domain)


def _unsafe_member(name: str) -> bool:
    """A member named outside its shard: absolute, or with a ``..`` part (never a sample, never a path)."""
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


class _ShardTooLarge(Exception):
    pass


class _Head:
    """``head`` (already read from ``f`` to tell its compression), then the rest of ``f``."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read() if n is None or n < 0 else self.f.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out


class _Metered:
    """The decompressed tar stream, counted: past ``limit`` bytes in all, or ``window`` bytes since
    :meth:`allow` (a tar header tarfile would read whole), reading stops."""

    def __init__(self, f, limit: int, window: int):
        self.f, self.limit, self.count, self.since, self.window = f, limit, 0, 0, window

    def allow(self, window: int) -> None:
        self.since, self.window = 0, window

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        self.since += len(data)
        if self.count > self.limit:
            raise _ShardTooLarge(f"over {self.limit} bytes decompressed (the shard limit)")
        if self.since > self.window:
            raise _ShardTooLarge(f"a tar header of over {self.window} bytes")
        return data


_COMPRESSIONS = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
                 (b"\xfd7zXZ\x00", lzma.LZMAFile))


def _decompressed(f):
    """``f`` (a plain, gzip, bzip2 or xz tar) as the plain tar stream, decompressed as it is read."""
    head = f.read(6)
    body = _Head(head, f)
    for magic, opener in _COMPRESSIONS:
        if head.startswith(magic):
            return opener(body)
    return body


def _members(tar: tarfile.TarFile, body: _Metered, max_member: int) -> Iterator[tuple[str | None, bytes | None, str | None]]:
    """``(name, bytes, None)`` per regular member, ``(name, None, reason)`` for one that is not read, and last
    ``(None, None, reason)`` when a limit stops the reading between two members."""
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            return
        except _ShardTooLarge as e:
            yield None, None, str(e)
            return
        tar.members = []  # stream mode keeps every TarInfo otherwise
        # until the next member: this one's data (read or skipped) and the next headers, up to a member's limit
        body.allow(-(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE + max_member + 64 * tarfile.BLOCKSIZE)
        if _unsafe_member(member.name):  # whatever its type: counted, never a sample or a path
            yield member.name, None, "member named outside the shard (absolute or '..'): not read"
        elif not member.isfile():
            continue
        elif too_large(member.size, max_member):
            yield member.name, None, too_large(member.size, max_member)
        else:
            yield member.name, tar.extractfile(member).read(), None


def _sample(uri: str, key: str, parts: dict[str, bytes], problem: str | None) -> Iterator[Record]:
    if problem is not None:
        yield Record(f"{uri}#{key}", b"", skipped=problem)
        return
    rec = _record(uri, key, parts)
    if rec is not None:
        yield rec


def read_shard(uri: str, max_member: int = MAX_IMAGE_BYTES, max_bytes: int = MAX_SHARD_BYTES) -> Iterator[Record]:
    """The samples of one ``.tar`` shard (plain, gzip, bzip2 or xz), in file order, read sequentially: memory
    holds one sample. A member over ``max_member`` bytes (or a sample over it in all) and a member named outside
    the shard are not read: each comes out as a :class:`Record` with ``skipped`` set, as does the rest of a shard
    past ``max_bytes`` decompressed bytes or with a tar header over ``max_member`` bytes."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    problem: str | None = None
    try:
        with storage.open_read(uri) as f:
            body = _Metered(_decompressed(f), max_bytes, max_member + 64 * tarfile.BLOCKSIZE)
            with tarfile.open(fileobj=body, mode="r|") as tar:
                for name, data, reason in _members(tar, body, max_member):
                    unsafe = name is None or _unsafe_member(name)
                    k, ext = (f"<member {name!r}>" if name else "<rest>", "") if unsafe else _split_member(name)
                    if k != key and (parts or problem):
                        yield from _sample(uri, key, parts, problem)
                        parts, problem = {}, None
                    if unsafe:  # its own skipped sample, in file order
                        key = None
                        if name is None:
                            log.warning("shard %s: %s: the rest of it is not read", uri, reason)
                            reason = f"rest of the shard not read: {reason}"
                        yield Record(f"{uri}#{k}", b"", skipped=reason)
                        continue
                    key = k
                    if problem is None and data is not None and sum(map(len, parts.values())) + len(data) > max_member:
                        reason = f"sample of over {max_member} bytes (the limit of one image file)"
                    if reason is not None:
                        parts, problem = {}, problem or reason
                    elif problem is None:
                        parts[ext] = data
        if parts or problem:
            yield from _sample(uri, key, parts, problem)
    except _ShardTooLarge as e:  # within a member: the sample being read, and any after it, one skipped record
        log.warning("shard %s: %s: the rest of it is not read", uri, e)
        rest = f"<rest from {key}>" if key is not None else "<rest>"
        yield Record(f"{uri}#{rest}", b"", skipped=f"rest of the shard not read: {e}")
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error, BotoCoreError) as e:
        raise EupeError(f"cannot read shard {uri}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def _shuffled(records: Iterator[Record], size: int, rng: random.Random,
              max_bytes: int = SHUFFLE_BUFFER_BYTES) -> Iterator[Record]:
    """Shuffle buffer: hold up to ``size`` records (and ``max_bytes`` of their data), emit a random one for
    each new one read."""
    buf: list[Record] = []
    held = 0
    for rec in records:
        buf.append(rec)
        held += len(rec.data)
        while buf and (len(buf) >= size or held > max_bytes):
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out = buf.pop()
            held -= len(out.data)
            yield out
    rng.shuffle(buf)
    yield from buf


class ImageStream(IterableDataset):
    """An endless stream of decoded samples, split across DDP ranks and DataLoader workers.

    Subclasses define :meth:`records` for one *reader* (``rank * num_workers + worker`` of
    ``world_size * num_workers``). Iterating yields ``(transform(image, seed), label, skipped)``,
    ``skipped`` being the undecodable files passed over since the previous sample; the augmentation
    seed of the ``n``-th sample of a reader is a function of ``(seed, reader, n)``.
    :func:`stream_loader` sets rank, world size, transform and the resume position.
    """

    def __init__(self, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.seed, self.max_pixels = seed, max_pixels
        self.rank, self.world_size = 0, 1
        self.transform: Callable[[Image.Image, int], Any] | None = None
        self.start_batch, self.batch_size = 0, 1

    def records(self, reader: int, readers: int) -> Iterator[Record]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        from eupe.data.loader import sample_seed

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Resume: the DataLoader takes batch j from worker j % workers, starting at worker 0. So the loader's
        # worker w plays the uninterrupted run's worker (w + start_batch) % workers, which had produced
        # ceil((start_batch - that worker) / workers) batches. Exact unless files were skipped before.
        worker = (worker + self.start_batch) % workers
        done = max(0, (self.start_batch - worker + workers - 1) // workers) * self.batch_size
        reader, readers = self.rank * workers + worker, self.world_size * workers
        skipped = 0
        for n, rec in enumerate(self.records(reader, readers)):
            if n < done:
                continue
            seed = sample_seed(self.seed, n * readers + reader)
            try:
                if rec.skipped:
                    raise UndecodableImage(rec.uri, rec.skipped)
                if isinstance(self.transform, Augment):  # crops while decoding: the file decoded no larger than needed
                    sample = self.transform.decode(rec.data, rec.uri, self.max_pixels, seed)
                else:
                    image = decode(rec.data, rec.uri, self.max_pixels)
                    sample = self.transform(image, seed) if self.transform else image
            except UndecodableImage as e:
                skipped += 1
                log.warning("skipping undecodable image %s", e)
                if skipped > MAX_CONSECUTIVE_UNDECODABLE:
                    raise EupeError(f"{rec.uri} and the {skipped - 1} samples before it do not decode: is the dataset broken?") from None
                continue
            yield sample, rec.label, skipped
            skipped = 0


class ShardStream(ImageStream):
    """WebDataset ``.tar`` shards (``<key>.jpg|png|...`` plus optional ``<key>.cls`` / ``<key>.json`` with
    ``label`` and ``domain``), local or on S3. Reader ``r`` of ``R`` owns shards ``r, r + R, ...``;
    each epoch it visits them in an order seeded by ``(seed, epoch, r)`` through a shuffle buffer."""

    def __init__(self, shards: Sequence[str], seed: int = 0, shuffle_buffer: int = 1000,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(seed, max_pixels)
        if not shards:
            raise EupeError("a shard stream needs at least one .tar shard")
        self.shards, self.shuffle_buffer = list(shards), shuffle_buffer
        self.classes: list[str] = []

    def check_readers(self, readers: int) -> None:
        if readers > len(self.shards):
            raise EupeError(f"{len(self.shards)} shards cannot feed {readers} readers (ranks x data workers): "
                            f"write more shards or lower data.num_workers ({self.shards[0]} ...)")

    def epoch(self, epoch: int, reader: int, readers: int) -> Iterator[Record]:
        """Reader ``reader``'s samples of one epoch; over all readers, every sample exactly once."""
        self.check_readers(readers)
        mine = self.shards[reader::readers]
        rng = random.Random(f"shards/{self.seed}/{epoch}/{reader}")
        rng.shuffle(mine)
        samples = (rec for shard in mine for rec in read_shard(shard))
        return _shuffled(samples, self.shuffle_buffer, rng)

    def records(self, reader: int, readers: int) -> Iterator[Record]:
        epoch = 0
        while True:
            count = 0
            for count, rec in enumerate(self.epoch(epoch, reader, readers), 1):
                yield rec
            if not count:
                raise EupeError(f"shards {', '.join(self.shards[reader::readers][:3])} ... of reader {reader} hold no images")
            epoch += 1


class IndexStream(ImageStream):
    """A map-style source as a stream: each epoch, a seeded permutation dealt round-robin to the readers."""

    def __init__(self, source: ImageSource, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(seed, max_pixels)
        self.source, self.classes = source, source.classes

    def check_readers(self, readers: int) -> None:
        if readers > len(self.source):
            raise EupeError(f"{len(self.source)} images cannot feed {readers} readers (ranks x data workers)")

    def epoch(self, epoch: int, reader: int, readers: int) -> Iterator[Record]:
        self.check_readers(readers)
        order = list(range(len(self.source)))
        random.Random(f"index/{self.seed}/{epoch}").shuffle(order)
        for i in order[reader::readers]:
            yield _read_record(self.source, i)

    def records(self, reader: int, readers: int) -> Iterator[Record]:
        epoch = 0
        while True:
            yield from self.epoch(epoch, reader, readers)
            epoch += 1


class MixedStream(ImageStream):
    """Streams mixed by weight: each sample's source is drawn from a generator seeded by ``(seed, reader)``.
    A non-empty ``domains[k]`` labels every sample of stream ``k``."""

    def __init__(self, streams: Sequence[ImageStream], weights: Sequence[float],
                 domains: Sequence[str | None] | None = None, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(seed, max_pixels)
        if not streams or len(streams) != len(weights):
            raise EupeError(f"a mixture needs one weight per source, got {len(streams)} sources and {len(weights)} weights")
        self.streams, self.weights = list(streams), list(weights)
        self.domains = list(domains) if domains is not None else [None] * len(streams)
        self.classes: list[str] = []  # labels stay those of each stream

    def check_readers(self, readers: int) -> None:
        for s in self.streams:
            if hasattr(s, "check_readers"):
                s.check_readers(readers)

    def records(self, reader: int, readers: int) -> Iterator[Record]:
        its = [s.records(reader, readers) for s in self.streams]
        rng = random.Random(f"mix/{self.seed}/{reader}")
        choices = range(len(its))
        while True:
            k = rng.choices(choices, self.weights)[0]
            rec = next(its[k])
            yield replace(rec, domain=self.domains[k]) if self.domains[k] else rec


# --------------------------------------------------------------------------- opening sources


def _expand_glob(pattern: str) -> list[str]:
    if storage.is_s3(pattern):
        first = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
        base = pattern[:first].rpartition("/")[0]
        depth = pattern.count("/")  # like a local glob, `*` stays within one path segment
        found = [u for u in storage.list_uris(base) if u.count("/") == depth and fnmatch.fnmatchcase(u, pattern)]
    else:
        found = sorted(glob.glob(pattern))
    if not found:
        raise EupeError(f"no files match {pattern}")
    return found


def open_uri(uri: str | Path, seed: int = 0, shuffle_buffer: int = 1000,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageSource | ShardStream:
    """One dataset URI -> a source: a local folder or ``s3://`` prefix of images (map-style), or ``.tar``
    shards (a stream) given as one shard, a glob (``s3://b/train-*.tar``) or a folder/prefix of shards.
    Its images decode with ``max_pixels`` (``validation.max_pixels``): a larger one is skipped and counted."""
    uri = str(uri)
    if any(c in uri for c in _GLOB_CHARS):
        files = _expand_glob(uri)
    elif uri.lower().endswith(SHARD_SUFFIX):
        if not storage.exists(uri):
            raise EupeError(f"shard not found: {uri}")
        files = [uri]
    else:
        if not storage.is_s3(uri) and not Path(uri).is_dir():
            raise EupeError(f"dataset folder not found: {uri}")
        files = storage.list_uris(uri)
        images = any(is_image(f) for f in files)
        shards = any(f.lower().endswith(SHARD_SUFFIX) for f in files)
        if images and shards:
            raise EupeError(f"{uri} holds both images and {SHARD_SUFFIX} shards: point at one of them")
        if images:
            return S3ImageFolder(uri, max_pixels) if storage.is_s3(uri) else ImageFolder(uri, max_pixels)
        if not shards:
            raise EupeError(f"no images in {uri} (looked for {', '.join(IMAGE_SUFFIXES)} and {SHARD_SUFFIX} shards)")
    tars = [f for f in files if f.lower().endswith(SHARD_SUFFIX)]
    if len(tars) != len(files):
        odd = next(f for f in files if not f.lower().endswith(SHARD_SUFFIX))
        raise EupeError(f"{uri}: expected only {SHARD_SUFFIX} shards, found {odd}")
    return ShardStream(tars, seed=seed, shuffle_buffer=shuffle_buffer, max_pixels=max_pixels)


def open_data(data: DataConfig, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageSource | ImageStream:
    """The training data of a config: ``data.sources`` mixed by weight, or ``data.root`` alone, decoded with the
    pixel limit of its validation (pass ``cfg.validation.max_pixels``).

    Map-style when every source is (folders, local or S3): a :class:`Mixture`, or the source itself when
    there is one and it has no domain. As soon as one source is ``.tar`` shards, everything streams:
    a :class:`MixedStream` (map-style sources streamed through :class:`IndexStream`).
    """
    from eupe.config import SourceSpec

    specs = list(data.sources) or [SourceSpec(uri=data.root)]
    opened = [open_uri(s.uri, seed, data.shuffle_buffer, max_pixels) for s in specs]
    weights = [s.weight for s in specs]
    domains = [s.domain for s in specs]
    if not any(isinstance(o, ImageStream) for o in opened):
        if len(opened) == 1 and domains[0] is None:
            return opened[0]
        return Mixture(opened, weights, domains)
    streams = [o if isinstance(o, ImageStream) else IndexStream(o, seed, max_pixels) for o in opened]
    if len(streams) == 1 and domains[0] is None:
        return streams[0]
    return MixedStream(streams, weights, domains, seed, max_pixels)


def iter_records(source: ImageSource | ImageStream) -> Iterator[Record]:
    """Every sample of a source once, in its natural order, undecoded (for scans and audits)."""
    if isinstance(source, ShardStream):
        for shard in source.shards:
            yield from read_shard(shard)
    elif isinstance(source, ImageStream):
        raise EupeError(f"{type(source).__name__} is endless: scan each of its sources instead")
    else:
        for i in range(len(source)):
            yield _read_record(source, i)


def _read_record(source: ImageSource, index: int) -> Record:
    """Image ``index`` of a map-style source, undecoded; a file too large to read is a skipped record."""
    try:
        data, skipped = source.read_bytes(index), None
    except UndecodableImage as e:
        data, skipped = b"", e.reason
    return Record(source.uri(index), data, source.label(index), source.domain(index), skipped)


def write_shards(source: ImageSource, out_dir: str | Path, per_shard: int, prefix: str = "shard") -> list[Path]:
    """Write a map-style source as WebDataset shards ``<prefix>-000000.tar ...`` of ``per_shard`` samples
    (``<key>.<ext>`` image bytes as they are, ``<key>.cls`` label, ``<key>.json`` domain and origin).
    ``out_dir`` is replaced as a whole (built under a temporary name, then renamed)."""
    if per_shard <= 0:
        raise EupeError(f"per_shard must be positive, got {per_shard}")
    names: list[str] = []
    with storage.atomic_dir(out_dir) as tmp:
        tar: tarfile.TarFile | None = None
        try:
            for i, rec in enumerate(r for r in iter_records(source) if not r.skipped):
                if i % per_shard == 0:
                    if tar is not None:
                        tar.close()
                    names.append(f"{prefix}-{len(names):06d}{SHARD_SUFFIX}")
                    tar = tarfile.open(tmp / names[-1], "w", format=tarfile.USTAR_FORMAT)
                key = f"{i:09d}"
                members = {f"{key}.{rec.uri.rsplit('.', 1)[-1].lower()}": rec.data,
                           f"{key}.json": json.dumps({"domain": rec.domain, "source": rec.uri}).encode()}
                if rec.label >= 0:
                    members[f"{key}.cls"] = str(rec.label).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        finally:
            if tar is not None:
                tar.close()
    return [Path(out_dir) / n for n in names]


# --------------------------------------------------------------------------- loading streams


class _OneImage:
    """A one-image ``ImageSource``, so a stream reuses the trainer's crop (``loader.DistillImages``)."""

    classes: list[str] = []

    def __init__(self, image: Image.Image):
        self.image = image

    def __len__(self) -> int:
        return 1

    def uri(self, index: int) -> str:
        return "<stream>"

    def label(self, index: int) -> int:
        return -1

    def open(self, index: int) -> Image.Image:
        return self.image


@dataclass(frozen=True)
class Augment:
    """uint8 ``[3, size, size]`` tensor of a decoded image: the trainer's random-resized crop + flip
    (``train``) or resize + centre crop, seeded per sample. ``fast``: see ``loader.DistillImages``."""

    size: int
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    train: bool = True
    fast: bool = True

    def __call__(self, image: Image.Image, seed: int) -> Any:
        from eupe.data.loader import DistillImages

        return DistillImages(_OneImage(image), self.size, self.crop_scale, self.hflip, self.train,
                             self.fast)[(0, seed)][0]

    def decode(self, data: bytes, uri: str, max_pixels: int, seed: int) -> Any:
        """The sample of an undecodable-or-not file: :class:`UndecodableImage` when it does not decode."""
        if self.train and self.fast:
            from eupe.data.loader import augment_bytes

            return augment_bytes(data, uri, max_pixels, seed, self.size, self.crop_scale, self.hflip)
        return self(decode(data, uri, max_pixels), seed)


def stream_loader(stream: ImageStream, size: int, batch_size: int, num_workers: int,
                  crop_scale: tuple[float, float] = (0.35, 1.0), hflip: bool = True, start_batch: int = 0,
                  rank: int = 0, world_size: int = 1, pin_memory: bool = False, train: bool = True,
                  fast: bool = True) -> DataLoader:
    """Batches ``(uint8 images [B, 3, size, size], labels [B], skipped [B])`` from a stream, for this rank.

    ``start_batch`` is the number of batches this rank already consumed (resume). The sample order is a
    function of ``(seed, world_size, num_workers)``: keep both when resuming.
    """
    if hasattr(stream, "check_readers"):
        stream.check_readers(world_size * max(1, num_workers))
    configured = copy.copy(stream)
    configured.rank, configured.world_size = rank, world_size
    configured.transform = Augment(size, tuple(crop_scale), hflip, train, fast)
    configured.start_batch, configured.batch_size = start_batch, batch_size
    # Its own generator, as step_loader's: iterating a DataLoader draws its base seed from the global RNG
    # otherwise, which a resumed run restores from the checkpoint (drop path, dropout) and which must then
    # match an uninterrupted run's. The samples themselves are seeded by their position in the stream.
    return DataLoader(configured, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(stream.seed))
