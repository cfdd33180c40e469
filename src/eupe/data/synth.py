"""Deterministic procedural generator of labelled synthetic images.

The whole distillation pipeline can run on this data with no network. A picture is
described by a :class:`Scene` (plain frozen data: background parameters plus a
tuple of :class:`Shape` objects, the first of which is the labelled main object),
and :func:`render` turns a scene into three aligned arrays at any resolution:

* an RGB image (uint8, HxWx3) with mild per-pixel noise,
* a segmentation mask (uint8, HxW): 0 is background, ``k + 1`` is class ``k``,
* a depth map (float32, HxW, metres).

Occlusion uses a z-buffer: at every pixel the nearest shape wins, whatever the
order of the shapes in the scene, so image, mask and depth always agree.

:func:`synthesize` writes an image-folder dataset
``out_dir/<class_name>/<index:06d>.<fmt>`` plus ``out_dir/synth.json``.
Image ``i`` depends only on ``(seed, i, size, num_classes)`` and its scene can be
rebuilt with :func:`image_spec`, so masks and depth maps for a written dataset can
be regenerated exactly later on. With ``dense=True`` they are written next to each
image in the evaluation layout (see :mod:`eupe.data.folder`):
``<index:06d>.mask.png`` (8-bit index mask, 0 background, ``k + 1`` class ``k``) and
``<index:06d>.depth.png`` (16-bit, millimetres).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eupe.data.folder import DEPTH_SUFFIX, MASK_SUFFIX

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "MIN_SIZE",
    "Scene",
    "Shape",
    "depth_to_png",
    "image_spec",
    "render",
    "sample_scene",
    "synthesize",
]

logger = logging.getLogger(__name__)

#: Class names; class ``k`` is a scene whose main object has ``Shape.kind == k``.
CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "ring",
    "stripes",
    "checker",
    "cross",
    "blob",
)

#: Bumped whenever the pixels produced for given parameters change; recorded in
#: ``synth.json`` so a dataset from an older generator is regenerated.
GENERATOR_VERSION = 1

#: Smallest image side accepted by :func:`synthesize`.
MIN_SIZE = 16

MANIFEST_NAME = "synth.json"
FORMATS = {"jpg": "JPEG", "png": "PNG"}
JPEG_QUALITY = 90

# In a shape's own unit frame (radius 1 == size / 2) every class fits inside this
# radius (square corners reach 0.8 * sqrt(2) ~ 1.13).
_BOUND = 1.15
# Brightness of the dark half of two-tone textures (stripes, checker).
_DARK = 0.35
# Vertical shading across an object: top is lighter, bottom darker, by this fraction.
_SHADE = 0.12


@dataclass(frozen=True)
class Shape:
    """One object in a scene.

    ``centre`` is in image fractions (x right, y down, both in [0, 1]); ``size`` is
    the object's diameter as a fraction of the shorter image side (so shapes keep
    their proportions on non-square images); ``rotation`` is in radians;
    ``colour`` is RGB 0..255; ``depth`` is the distance to the camera in metres.
    """

    kind: int
    centre: tuple[float, float]
    size: float
    rotation: float
    colour: tuple[int, int, int]
    depth: float

    def __post_init__(self) -> None:
        if not 0 <= self.kind < len(CLASSES):
            raise ValueError(f"Shape: kind must be in [0, {len(CLASSES)}), got {self.kind!r}")
        if not self.size > 0:
            raise ValueError(f"Shape: size must be > 0, got {self.size!r}")
        if not self.depth > 0:
            raise ValueError(f"Shape: depth must be > 0, got {self.depth!r}")
        if len(self.colour) != 3 or not all(0 <= c <= 255 for c in self.colour):
            raise ValueError(f"Shape: colour must be 3 values in 0..255, got {self.colour!r}")


@dataclass(frozen=True)
class Scene:
    """A full picture: background plus shapes; ``shapes[0]`` is the labelled object.

    The background is a linear gradient from ``bg_colours[0]`` to ``bg_colours[1]``
    along direction ``bg_angle`` (radians) at constant depth ``bg_depth``, which must
    lie behind every shape. ``noise`` is the standard deviation (grey levels) of
    the zero-mean per-pixel uniform noise added to the image, drawn from ``noise_seed``.
    """

    label: int
    bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_angle: float
    noise: float
    noise_seed: int
    bg_depth: float
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0 <= self.label < len(CLASSES):
            raise ValueError(f"Scene: label must be in [0, {len(CLASSES)}), got {self.label!r}")
        if not self.shapes:
            raise ValueError("Scene: shapes must hold at least the main object, got none")
        if self.shapes[0].kind != self.label:
            raise ValueError(
                f"Scene: shapes[0].kind must equal label {self.label}, got {self.shapes[0].kind}"
            )
        if self.noise < 0:
            raise ValueError(f"Scene: noise must be >= 0, got {self.noise!r}")
        for s in self.shapes:
            if not s.depth < self.bg_depth:
                raise ValueError(
                    f"Scene: shape depth {s.depth} must be < bg_depth {self.bg_depth}"
                )


# --------------------------------------------------------------------------- sampling


def _colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).sum())


def sample_scene(
    rng: np.random.Generator, label: int, *, num_classes: int = len(CLASSES)
) -> Scene:
    """Draw a random scene whose main object is of class ``label``.

    The main object is fully inside the frame and never overlapped by the 0-3
    smaller distractors (drawn from the other classes among the first
    ``num_classes``), so the class is always readable from the image.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(CLASSES)}], got {num_classes!r}")
    if not 0 <= label < num_classes:
        raise ValueError(f"label must be in [0, {num_classes}), got {label!r}")

    bg_a = rng.integers(20, 236, size=3)
    bg_b = np.clip(bg_a + rng.integers(-60, 61, size=3), 0, 255)
    bg_mean = (bg_a + bg_b) / 2.0
    bg_angle = float(rng.uniform(0.0, 2.0 * math.pi))
    noise = float(rng.uniform(2.0, 8.0))
    noise_seed = int(rng.integers(0, 2**32))
    bg_depth = float(rng.uniform(8.0, 10.0))

    def object_colour() -> tuple[int, int, int]:
        # Rejection-sample a colour that stands out from the background.
        best, best_d = None, -1.0
        for _ in range(32):
            c = rng.integers(0, 256, size=3)
            d = _colour_distance(c, bg_mean)
            if d > best_d:
                best, best_d = c, d
            if d >= 180:
                break
        assert best is not None
        return (int(best[0]), int(best[1]), int(best[2]))

    main_size = float(rng.uniform(0.35, 0.6))
    main_bound = _BOUND * main_size / 2
    main = Shape(
        kind=label,
        centre=(
            float(rng.uniform(main_bound, 1 - main_bound)),
            float(rng.uniform(main_bound, 1 - main_bound)),
        ),
        size=main_size,
        rotation=float(rng.uniform(0.0, 2.0 * math.pi)),
        colour=object_colour(),
        depth=float(rng.uniform(2.0, 6.0)),
    )

    shapes = [main]
    others = [k for k in range(num_classes) if k != label]
    n_distractors = int(rng.integers(0, 4)) if others else 0
    for _ in range(n_distractors):
        kind = others[int(rng.integers(0, len(others)))]
        size = float(rng.uniform(0.1, 0.22))
        bound = _BOUND * size / 2
        # Distances in [0,1]^2 fractions never exceed the rendered distance measured
        # in shorter-side units, so this keeps clear of the main object at any aspect.
        centre = None
        for _ in range(20):
            c = (float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 1.0)))
            if math.hypot(c[0] - main.centre[0], c[1] - main.centre[1]) >= main_bound + bound:
                centre = c
                break
        if centre is None:
            continue
        shapes.append(
            Shape(
                kind=kind,
                centre=centre,
                size=size,
                rotation=float(rng.uniform(0.0, 2.0 * math.pi)),
                colour=object_colour(),
                depth=float(rng.uniform(1.0, 7.5)),
            )
        )

    return Scene(
        label=label,
        bg_colours=(
            (int(bg_a[0]), int(bg_a[1]), int(bg_a[2])),
            (int(bg_b[0]), int(bg_b[1]), int(bg_b[2])),
        ),
        bg_angle=bg_angle,
        noise=noise,
        noise_seed=noise_seed,
        bg_depth=bg_depth,
        shapes=tuple(shapes),
    )


# --------------------------------------------------------------------------- rendering


def _footprint(kind: int, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Inside-test and dark-texture mask of class ``kind`` in its unit frame."""
    name = CLASSES[kind]
    if name == "circle":
        return px * px + py * py <= 1.0, None
    if name == "square":
        return np.maximum(np.abs(px), np.abs(py)) <= 0.8, None
    if name == "triangle":
        # Equilateral, vertices on the unit circle at (0, -1), (+-sqrt3/2, 1/2).
        s3 = math.sqrt(3.0)
        return (py <= 0.5) & (s3 * px - py <= 1.0) & (-s3 * px - py <= 1.0), None
    if name == "ring":
        r2 = px * px + py * py
        return (r2 <= 1.0) & (r2 >= 0.55**2), None
    if name == "stripes":
        bands = np.floor((px + 1.0) * 2.5).astype(np.int64)
        return px * px + py * py <= 1.0, (bands & 1) == 1
    if name == "checker":
        cx = np.floor((px + 0.8) / 0.4).astype(np.int64)
        cy = np.floor((py + 0.8) / 0.4).astype(np.int64)
        return np.maximum(np.abs(px), np.abs(py)) <= 0.8, ((cx + cy) & 1) == 1
    if name == "cross":
        ax, ay = np.abs(px), np.abs(py)
        return ((ax <= 0.28) & (ay <= 1.0)) | ((ay <= 0.28) & (ax <= 1.0)), None
    if name == "blob":
        theta = np.arctan2(py, px)
        radius = 0.78 + 0.14 * np.sin(3.0 * theta) + 0.08 * np.cos(5.0 * theta + 1.0)
        return px * px + py * py <= radius * radius, None
    raise AssertionError(f"no footprint for class {name!r}")  # pragma: no cover


def render(scene: Scene, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``scene`` at ``height`` x ``width``.

    Returns ``(image, mask, depth)``: uint8 HxWx3 RGB, uint8 HxW class map
    (0 background, ``kind + 1`` for object pixels, nearest object wins), float32
    HxW depth in metres. Deterministic: the same scene gives the same arrays.
    """
    if int(height) != height or height < 1:
        raise ValueError(f"height must be a positive integer, got {height!r}")
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    height, width = int(height), int(width)

    # Pixel centres; row vector for x and column vector for y so every per-pixel
    # expression below broadcasts to HxW without materialising a meshgrid.
    xs = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
    ys = (np.arange(height, dtype=np.float32) + 0.5)[:, None]

    # Background gradient. Colour planes are kept channel-first (3xHxW) while
    # drawing: broadcasting over a trailing axis of length 3 is several times slower.
    ca, sa = math.cos(scene.bg_angle), math.sin(scene.bg_angle)
    t = 0.5 + ((xs / width - 0.5) * ca + (ys / height - 0.5) * sa) / math.sqrt(2.0)
    t = np.clip(t, 0.0, 1.0)  # HxW
    col_a = np.asarray(scene.bg_colours[0], dtype=np.float32)[:, None, None]
    col_b = np.asarray(scene.bg_colours[1], dtype=np.float32)[:, None, None]
    planes = col_a + (col_b - col_a) * t[None]  # 3xHxW float32

    mask = np.zeros((height, width), dtype=np.uint8)
    depth = np.full((height, width), scene.bg_depth, dtype=np.float32)
    # z-buffer for shapes only; the background lies behind everything.
    zbuf = np.full((height, width), np.inf, dtype=np.float32)

    unit = float(min(height, width))
    for shape in scene.shapes:
        r_px = shape.size / 2.0 * unit
        cx_px, cy_px = shape.centre[0] * width, shape.centre[1] * height
        # Only evaluate the shape's bounding box (clipped to the frame).
        reach = _BOUND * r_px + 1.0
        x0, x1 = max(0, int(math.floor(cx_px - reach))), min(width, int(math.ceil(cx_px + reach)))
        y0, y1 = max(0, int(math.floor(cy_px - reach))), min(height, int(math.ceil(cy_px + reach)))
        if x0 >= x1 or y0 >= y1:
            continue  # entirely outside the frame
        dx = (xs[:, x0:x1] - cx_px) / r_px
        dy = (ys[y0:y1, :] - cy_px) / r_px
        c, s = math.cos(shape.rotation), math.sin(shape.rotation)
        px = c * dx + s * dy  # hxw, the shape's own unit frame
        py = -s * dx + c * dy
        inside, dark = _footprint(shape.kind, px, py)
        win = inside & (shape.depth < zbuf[y0:y1, x0:x1])
        if not win.any():
            continue
        shade = 1.0 - _SHADE * np.clip(py, -1.0, 1.0)
        if dark is not None:
            shade = np.where(dark, shade * _DARK, shade)
        colour = np.asarray(shape.colour, dtype=np.float32)[:, None, None]
        np.copyto(planes[:, y0:y1, x0:x1], colour * shade[None], where=win[None])
        zbuf[y0:y1, x0:x1][win] = shape.depth
        depth[y0:y1, x0:x1][win] = shape.depth
        mask[y0:y1, x0:x1][win] = shape.kind + 1

    if scene.noise > 0:
        # Zero-mean uniform noise with standard deviation ``scene.noise``.
        noise_rng = np.random.default_rng(scene.noise_seed)
        u = noise_rng.random(planes.shape, dtype=np.float32)
        u -= 0.5
        planes += u * np.float32(scene.noise * math.sqrt(12.0))
    planes += 0.5  # round to nearest on the truncating cast below
    np.clip(planes, 0.0, 255.0, out=planes)
    out = np.ascontiguousarray(planes.astype(np.uint8).transpose(1, 2, 0))
    return out, mask, depth


# --------------------------------------------------------------------------- datasets


def _check_size(size: Any) -> tuple[int, int]:
    """Validate ``size`` and return the inclusive (min, max) side range."""
    if isinstance(size, bool):
        raise ValueError(f"size must be an int or a (min, max) pair, got {size!r}")
    if isinstance(size, (int, np.integer)):
        lo = hi = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size
    ):
        lo, hi = int(size[0]), int(size[1])
        if lo > hi:
            raise ValueError(f"size range must have min <= max, got {tuple(size)!r}")
    else:
        raise ValueError(f"size must be an int or a (min, max) pair of ints, got {size!r}")
    if lo < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size!r}")
    return lo, hi


def image_spec(
    seed: int,
    index: int,
    size: int | tuple[int, int] = 256,
    num_classes: int = len(CLASSES),
) -> tuple[Scene, int, int]:
    """The ``(scene, height, width)`` of image ``index`` in a :func:`synthesize` run.

    Depends only on these arguments (not on the number of images), so masks and
    depth maps of a written dataset can be rebuilt with :func:`render`.
    """
    lo, hi = _check_size(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    if lo == hi:
        height = width = lo
    else:
        height = int(rng.integers(lo, hi + 1))
        width = int(rng.integers(lo, hi + 1))
    scene = sample_scene(rng, index % num_classes, num_classes=num_classes)
    return scene, height, width


def _params(num_images: int, size: Any, seed: int, fmt: str, num_classes: int, dense: bool = False) -> dict[str, Any]:
    """Validated, JSON-normalised parameters of a run (what idempotence compares)."""
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images <= 0:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or not 1 <= num_classes <= len(CLASSES)
    ):
        raise ValueError(f"num_classes must be in [1, {len(CLASSES)}], got {num_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(dense, bool):
        raise ValueError(f"dense must be a bool, got {dense!r}")
    lo, hi = _check_size(size)
    params = {
        "num_images": int(num_images),
        "size": lo if lo == hi else [lo, hi],
        "seed": int(seed),
        "fmt": fmt,
        "num_classes": int(num_classes),
        "version": GENERATOR_VERSION,
    }
    if dense:  # only when set, so manifests of earlier image-only runs still match
        params["dense"] = True
    return params


def depth_to_png(depth: np.ndarray) -> Image.Image:
    """Depth in metres -> a 16-bit PNG image in millimetres (0 means no measurement)."""
    mm = np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16)
    return Image.fromarray(mm)


def _complete_run(out_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of ``out_dir`` if it is a complete run with ``params``, else None."""
    manifest = _read_manifest(out_dir)
    if manifest is None or manifest.get("params") != params:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or len(files) != params["num_images"]:
        return None
    labels = manifest.get("labels", [])
    if not isinstance(labels, list) or len(labels) != (2 * len(files) if params.get("dense") else 0):
        return None
    if not all((out_dir / f).is_file() for f in files + labels):
        return None
    return manifest


def synthesize(
    out_dir: str | os.PathLike[str],
    num_images: int,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    fmt: str = "jpg",
    num_classes: int = len(CLASSES),
    dense: bool = False,
) -> dict[str, Any]:
    """Write a balanced image-folder dataset to ``out_dir`` and return its manifest.

    Files are ``out_dir/<class_name>/<index:06d>.<fmt>``; image ``index`` has label
    ``index % num_classes``. ``size`` is a fixed side or an inclusive ``(min, max)``
    range from which height and width are drawn independently per image. Output
    is byte-identical for the same arguments. It finishes like every step
    (:class:`eupe.step.StepRun`): built in a staging folder, published by name,
    ``result.json`` last; a complete earlier run with identical parameters (per
    ``out_dir/synth.json`` and its ``result.json``) is kept as is. A different
    earlier run is replaced, class folders it wrote and this run does not included;
    an existing ``out_dir`` not written by this function is refused
    (``FileExistsError``) rather than deleted. ``dense=True`` also writes each
    image's segmentation mask and depth map next to it (``<index>.mask.png``,
    ``<index>.depth.png``), listed under ``labels`` in the manifest.
    """
    from eupe.errors import EupeError
    from eupe import storage
    from eupe.fingerprint import fingerprint
    from eupe.step import StepRun

    params = _params(num_images, size, seed, fmt, num_classes, dense)
    local = not storage.is_s3(out_dir)  # an s3:// prefix: written through the step's staging, uploaded
    out_dir = Path(out_dir) if local else str(out_dir).rstrip("/")

    previous = None
    if local and out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"synthesize: out_dir {out_dir} exists and is not a directory")
        previous = _read_manifest(out_dir)
        if previous is None and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
            raise FileExistsError(
                f"synthesize: out_dir {out_dir} is non-empty and has no {MANIFEST_NAME}; "
                "refusing to replace a directory it did not write"
            )
    fp = fingerprint("data-synth", {}, **params)
    # the images are a function of the parameters and of this module alone: another change of the library
    # does not rewrite them (new file times would make every step that reads the dataset run again)
    fp["code"] = "synth+" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    try:
        run = StepRun(out_dir, "data-synth", fp)
    except EupeError as e:
        raise FileExistsError(f"synthesize: {e}") from None
    if run.done:
        existing = _complete_run(out_dir, params) if local else _s3_manifest(run.path(MANIFEST_NAME), params)
        if existing is not None:
            logger.info("synth: %s already holds %d images with these parameters; skipping",
                        out_dir, params["num_images"])
            return existing
        run.restart()  # files were removed since: write the run again
    class_names = list(CLASSES[: params["num_classes"]])
    with run.staging() as tmp_dir:
        manifest = _write(tmp_dir, params, size, class_names, out_dir)
    for name in (previous or {}).get("classes", []):  # an earlier run's class folders this run has not
        if local and name not in class_names and (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
    run.finish({"images": len(manifest["files"]), "classes": len(class_names)},
               {"data": out_dir, "manifest": run.path(MANIFEST_NAME)})
    logger.info("synth: wrote %d images to %s", params["num_images"], out_dir)
    return json.loads(json.dumps(manifest))  # exactly what synth.json holds (JSON-normalised), as the skip path


def _s3_manifest(uri: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """synth.json of an up-to-date run on S3 (its result.json vouched for its files), or None."""
    from eupe import storage
    from eupe.errors import EupeError

    try:
        manifest = storage.read_json(uri)
    except EupeError:
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("params") == params else None


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write(tmp_dir: Path, params: dict[str, Any], size: Any, class_names: list[str], out_dir: Path) -> dict[str, Any]:
    """Render every image (and, dense, its labels) into ``tmp_dir``; return the manifest written there."""
    n, ext, dense = params["num_images"], params["fmt"], bool(params.get("dense"))
    pil_format = FORMATS[ext]
    # The per-pixel noise makes PNGs nearly incompressible: favour speed.
    save_kwargs: dict[str, Any] = {"quality": JPEG_QUALITY} if pil_format == "JPEG" else {"compress_level": 1}
    for name in class_names:
        (tmp_dir / name).mkdir(parents=True)
    files: list[str] = []
    labels: list[str] = []
    counts = dict.fromkeys(class_names, 0)
    step = max(1, n // 10)
    logger.info("synth: writing %d images (%s, size %s, seed %d) to %s", n, ext, params["size"], params["seed"], out_dir)
    for i in range(n):
        scene, height, width = image_spec(params["seed"], i, size, params["num_classes"])
        image, mask, depth = render(scene, height, width)
        stem = f"{class_names[scene.label]}/{i:06d}"
        rel = f"{stem}.{ext}"
        Image.fromarray(image).save(tmp_dir / rel, format=pil_format, **save_kwargs)
        files.append(rel)
        if dense:
            Image.fromarray(mask).save(tmp_dir / (stem + MASK_SUFFIX), format="PNG", compress_level=1)
            depth_to_png(depth).save(tmp_dir / (stem + DEPTH_SUFFIX), format="PNG", compress_level=1)
            labels += [stem + MASK_SUFFIX, stem + DEPTH_SUFFIX]
        counts[class_names[scene.label]] += 1
        if (i + 1) % step == 0 or i + 1 == n:
            logger.info("synth: %d/%d images (%d%%)", i + 1, n, (i + 1) * 100 // n)
    manifest: dict[str, Any] = {"generator": __name__, "params": params, "classes": class_names,
                                "counts": counts, "files": files}
    if dense:
        manifest["labels"] = labels
    (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
