"""Tests for the procedural synthetic dataset generator (eupe.data.synth)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eupe.data.synth import (
    CLASSES,
    Scene,
    Shape,
    image_spec,
    render,
    sample_scene,
    synthesize,
)


def _files(root: Path) -> dict[str, bytes]:
    """The dataset's files (result.json, the step's completion marker, holds a timestamp: checked apart)."""
    result = json.loads((root / "result.json").read_text())
    assert result["step"] == "data-synth" and result["status"] == "ok"
    assert result["metrics"]["images"] == len(json.loads((root / "synth.json").read_text())["files"])
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "result.json"}


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", 16, size=48, seed=3)
    b = synthesize(tmp_path / "b", 16, size=48, seed=3)
    c = synthesize(tmp_path / "c", 16, size=48, seed=4)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert len(fa) == 17  # 16 images + synth.json
    assert fa == fb
    # Same layout, but every image differs with another seed.
    assert fa.keys() == fc.keys()
    images = [k for k in fa if k != "synth.json"]
    assert all(fa[k] != fc[k] for k in images)
    assert a["params"]["seed"] == 3 and c["params"]["seed"] == 4


def test_sample_scene_is_deterministic_per_rng_state() -> None:
    s1 = sample_scene(np.random.default_rng(7), 2)
    s2 = sample_scene(np.random.default_rng(7), 2)
    s3 = sample_scene(np.random.default_rng(8), 2)
    assert s1 == s2
    assert s1 != s3
    r1, r2 = render(s1, 40, 56), render(s2, 40, 56)
    for x, y in zip(r1, r2):
        np.testing.assert_array_equal(x, y)


def test_png_files_are_exactly_the_rendered_scene(tmp_path: Path) -> None:
    # image_spec must reproduce what synthesize wrote, so masks/depth can be rebuilt later.
    manifest = synthesize(tmp_path / "ds", 6, size=(20, 40), seed=11, fmt="png", num_classes=3)
    for i, rel in enumerate(manifest["files"]):
        scene, h, w = image_spec(11, i, (20, 40), num_classes=3)
        expected, _, _ = render(scene, h, w)
        got = np.asarray(Image.open(tmp_path / "ds" / rel))
        np.testing.assert_array_equal(got, expected)
        assert rel == f"{CLASSES[scene.label]}/{i:06d}.png"


# --------------------------------------------------------------------------- layout


def test_class_balance_and_folder_layout(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = synthesize(out, 10, size=32, num_classes=4)
    names = list(CLASSES[:4])
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["synth.json", "result.json"])
    # index i has label i % 4: 10 images -> 3, 3, 2, 2.
    assert manifest["counts"] == {names[0]: 3, names[1]: 3, names[2]: 2, names[3]: 2}
    assert manifest["classes"] == names
    for i in range(10):
        path = out / names[i % 4] / f"{i:06d}.jpg"
        assert path.is_file()
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert on_disk == sorted(manifest["files"])
    assert json.loads((out / "synth.json").read_text()) == manifest
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_full_class_set_is_balanced(tmp_path: Path) -> None:
    manifest = synthesize(tmp_path / "ds", 3 * len(CLASSES), size=16)
    assert manifest["counts"] == {name: 3 for name in CLASSES}


def test_range_sizes_vary_and_stay_in_range(tmp_path: Path) -> None:
    manifest = synthesize(tmp_path / "ds", 24, size=(24, 64), seed=5)
    dims = set()
    for rel in manifest["files"]:
        with Image.open(tmp_path / "ds" / rel) as im:
            w, h = im.size
        assert 24 <= w <= 64 and 24 <= h <= 64
        dims.add((w, h))
    assert len({w for w, _ in dims}) > 3 and len({h for _, h in dims}) > 3
    assert any(w != h for w, h in dims)  # height and width drawn independently
    assert manifest["params"]["size"] == [24, 64]


# --------------------------------------------------------------------------- masks / depth


@pytest.mark.parametrize("seed", range(4))
def test_mask_and_depth_consistent_with_sampled_scene(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label in range(len(CLASSES)):
        scene = sample_scene(rng, label)
        h, w = (48, 80) if label % 2 else (80, 48)
        image, mask, depth = render(scene, h, w)
        assert image.shape == (h, w, 3) and image.dtype == np.uint8
        assert mask.shape == (h, w) and np.issubdtype(mask.dtype, np.integer)
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert scene.shapes[0].kind == label
        values = set(np.unique(mask).tolist())
        assert label + 1 in values  # the main object is visible
        assert 0 in values  # and does not fill the frame
        assert values <= {0} | {s.kind + 1 for s in scene.shapes}
        # Background pixels carry the background depth, object pixels the depth of
        # a shape of that class, always in front of the background.
        assert np.all(depth[mask == 0] == np.float32(scene.bg_depth))
        for v in values - {0}:
            allowed = {np.float32(s.depth) for s in scene.shapes if s.kind + 1 == v}
            assert set(np.unique(depth[mask == v]).tolist()) <= allowed
        assert np.all(depth[mask > 0] < scene.bg_depth)


def test_main_object_is_never_hidden_by_distractors() -> None:
    rng = np.random.default_rng(123)
    for i in range(64):
        scene = sample_scene(rng, i % len(CLASSES))
        _, mask, _ = render(scene, 64, 64)
        _, alone, _ = render(
            Scene(scene.label, scene.bg_colours, scene.bg_angle, 0.0, 0, scene.bg_depth, scene.shapes[:1]),
            64,
            64,
        )
        main = alone == scene.label + 1
        assert main.any()
        assert np.all(mask[main] == scene.label + 1)


def _two_shape_scene(order: str) -> tuple[Scene, Shape, Shape]:
    far = Shape(kind=0, centre=(0.5, 0.5), size=0.6, rotation=0.0, colour=(200, 30, 30), depth=5.0)
    near = Shape(kind=1, centre=(0.6, 0.5), size=0.3, rotation=0.0, colour=(20, 40, 220), depth=2.0)
    shapes = (far, near) if order == "far_first" else (near, far)
    label = shapes[0].kind
    scene = Scene(
        label=label,
        bg_colours=((90, 90, 90), (120, 120, 120)),
        bg_angle=0.0,
        noise=0.0,
        noise_seed=0,
        bg_depth=9.0,
        shapes=shapes,
    )
    return scene, far, near


@pytest.mark.parametrize("order", ["far_first", "near_first"])
def test_nearer_object_occludes_farther_one(order: str) -> None:
    scene, far, near = _two_shape_scene(order)
    image, mask, depth = render(scene, 100, 100)
    # (60, 50): centre of the near square, inside the far circle too.
    y, x = 50, 60
    assert mask[y, x] == near.kind + 1
    assert depth[y, x] == pytest.approx(near.depth)
    # No noise; shading is ~1 near the object's centre row.
    assert np.abs(image[y, x].astype(int) - np.array(near.colour)).max() <= 2
    # (50, 25): inside the far circle only.
    assert mask[50, 25] == far.kind + 1
    assert depth[50, 25] == pytest.approx(far.depth)
    # Corner: background.
    assert mask[0, 0] == 0
    assert depth[0, 0] == pytest.approx(scene.bg_depth)
    # The whole near square is visible: it covers a 0.8 * 0.3 * 100 = 24 px side.
    assert (mask == near.kind + 1).sum() == pytest.approx(24 * 24, rel=0.1)


def test_render_does_not_depend_on_shape_order() -> None:
    a, _, _ = _two_shape_scene("far_first")
    b, _, _ = _two_shape_scene("near_first")
    ra, rb = render(a, 64, 96), render(b, 64, 96)
    for x, y in zip(ra, rb):
        np.testing.assert_array_equal(x, y)


def test_scene_rejects_shape_behind_background() -> None:
    shape = Shape(kind=0, centre=(0.5, 0.5), size=0.5, rotation=0.0, colour=(1, 2, 3), depth=9.5)
    with pytest.raises(ValueError, match="bg_depth"):
        Scene(0, ((0, 0, 0), (0, 0, 0)), 0.0, 0.0, 0, 9.0, (shape,))


def test_classes_render_distinct_footprints() -> None:
    # Same placement, one class at a time: every class gives a different mask or texture.
    renders = []
    for k in range(len(CLASSES)):
        shape = Shape(kind=k, centre=(0.5, 0.5), size=0.8, rotation=0.3, colour=(250, 250, 250), depth=3.0)
        scene = Scene(k, ((0, 0, 0), (0, 0, 0)), 0.0, 0.0, 0, 9.0, (shape,))
        image, mask, _ = render(scene, 64, 64)
        assert (mask == k + 1).sum() > 200
        renders.append(image.tobytes())
    assert len(set(renders)) == len(CLASSES)


# --------------------------------------------------------------------------- idempotence


def test_second_call_does_not_rewrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    first = synthesize(out, 12, size=32, seed=1)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    dir_ino = out.stat().st_ino
    second = synthesize(out, 12, size=32, seed=1)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert out.stat().st_ino == dir_ino


def test_different_parameters_replace_previous_run(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    synthesize(out, 12, size=32, seed=1)
    old = _files(out)
    manifest = synthesize(out, 6, size=32, seed=2, fmt="png", num_classes=2)
    new = _files(out)
    assert set(new) == set(manifest["files"]) | {"synth.json"}
    assert all(k.endswith(".png") for k in manifest["files"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["circle", "square", "synth.json", "result.json"])
    assert new["synth.json"] != old["synth.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no tmp/old dirs left behind


def test_incomplete_previous_run_is_regenerated(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = synthesize(out, 8, size=32)
    victim = out / manifest["files"][3]
    victim.unlink()
    again = synthesize(out, 8, size=32)
    assert again == manifest
    assert victim.is_file()


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="synth.json"):
        synthesize(out, 4, size=32)
    assert (out / "precious.txt").read_text() == "keep me"


def test_empty_existing_directory_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    manifest = synthesize(out, 4, size=32)
    assert len(manifest["files"]) == 4 and (out / "synth.json").is_file()


# --------------------------------------------------------------------------- arguments / logging


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_images": 0}, "num_images"),
        ({"num_images": -3}, "num_images"),
        ({"fmt": "gif"}, "fmt"),
        ({"fmt": "JPG "}, "fmt"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": len(CLASSES) + 1}, "num_classes"),
        ({"size": 15}, "size"),
        ({"size": (8, 64)}, "size"),
        ({"size": (64, 32)}, "size"),
        ({"size": (16, 32, 64)}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"num_images": 4, "size": 32, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}\b") as info:
        synthesize(tmp_path / "ds", **args)
    message = str(info.value)
    assert "\n" not in message
    bad = kwargs[name]
    assert repr(bad) in message or str(bad) in message
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_progress_is_logged_about_every_ten_percent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="eupe.data.synth"):
        synthesize(tmp_path / "ds", 40, size=16)
    progress = [r.getMessage() for r in caplog.records if re.search(r"\d+/40 images", r.getMessage())]
    assert 9 <= len(progress) <= 11
    assert progress[-1].startswith("synth: 40/40")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eupe.data.synth"):
        synthesize(tmp_path / "ds", 40, size=16)
    assert any("skipping" in r.getMessage() for r in caplog.records)
    assert not any(re.search(r"\d+/40 images", r.getMessage()) for r in caplog.records)


def test_render_rejects_bad_dimensions() -> None:
    scene = sample_scene(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="height"):
        render(scene, 0, 10)
    with pytest.raises(ValueError, match="width"):
        render(scene, 10, -1)


def test_sample_scene_validates_label() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label"):
        sample_scene(rng, len(CLASSES))
    with pytest.raises(ValueError, match="label"):
        sample_scene(rng, 3, num_classes=3)
    # With a reduced class set, distractors come only from that set.
    for _ in range(20):
        scene = sample_scene(rng, 1, num_classes=2)
        assert {s.kind for s in scene.shapes} <= {0, 1}
        assert all(s.kind == 0 for s in scene.shapes[1:])
    assert math.isfinite(scene.bg_depth)


# --------------------------------------------------------------------------- dense labels (evaluation)


def test_dense_writes_masks_and_millimetre_depth_that_match_the_render(tmp_path: Path) -> None:
    manifest = synthesize(tmp_path / "ds", 6, size=(20, 40), seed=11, fmt="png", num_classes=3, dense=True)
    assert manifest["params"]["dense"] is True
    assert len(manifest["labels"]) == 12
    for i, rel in enumerate(manifest["files"]):
        scene, h, w = image_spec(11, i, (20, 40), num_classes=3)
        image, mask, depth = render(scene, h, w)
        stem = rel.rsplit(".", 1)[0]
        assert f"{stem}.mask.png" in manifest["labels"] and f"{stem}.depth.png" in manifest["labels"]
        with Image.open(tmp_path / "ds" / f"{stem}.mask.png") as m, Image.open(tmp_path / "ds" / f"{stem}.depth.png") as d:
            assert m.mode == "L" and d.mode.startswith("I;16") and m.size == d.size == (w, h)
            np.testing.assert_array_equal(np.asarray(m), mask)
            mm = np.asarray(d).astype(np.int64)
        np.testing.assert_array_equal(mm, np.rint(depth * 1000).astype(np.int64))
        assert mm.min() >= 1000 and mm.max() <= 10000  # shapes at 1-7.5 m, background at 8-10 m
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ds" / rel)), image)


def test_dense_labels_are_not_images_of_the_dataset(tmp_path: Path) -> None:
    from eupe.data.folder import open_source

    synthesize(tmp_path / "ds", 8, size=32, num_classes=2, fmt="png", dense=True)
    source = open_source(str(tmp_path / "ds"))
    assert len(source) == 8
    assert not any(source.uri(i).endswith((".mask.png", ".depth.png")) for i in range(len(source)))


def test_dense_runs_are_idempotent_and_complete(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    first = synthesize(out, 6, size=32, dense=True)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert synthesize(out, 6, size=32, dense=True) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    victim = out / first["labels"][3]
    victim.unlink()  # a missing label makes the run incomplete: regenerated
    synthesize(out, 6, size=32, dense=True)
    assert victim.is_file()
    plain = synthesize(out, 6, size=32)  # image-only parameters replace the dense run
    assert "dense" not in plain["params"] and "labels" not in plain
    assert not list(out.rglob("*.mask.png")) and not list(out.rglob("*.depth.png"))


def test_synth_cli_dense_flag(tmp_path: Path) -> None:
    from eupe.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "ds"), "--num-images", "4", "--size", "32", "--dense"]) == 0
    assert len(list((tmp_path / "ds").rglob("*.mask.png"))) == 4
    assert len(list((tmp_path / "ds").rglob("*.depth.png"))) == 4
