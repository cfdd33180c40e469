"""``eupe evaluate`` end to end on tiny synthetic dense data with a tiny trained student."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import boto3
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from eupe.cli import main
from eupe.data.synth import synthesize
from eupe.distill.normalize import FeatureStats, save_stats
from eupe.evaluate.gate import gated_values

KEYS = ("knn_top1", "seg_miou", "depth_rmse", "depth_delta1", "keypoint_pck", "fidelity")
PLOTS = ("eval_metrics.png", "seg_example.png", "depth_example.png", "keypoints_example.png")
FAST = ["--set", "eval.probe_epochs=4", "--set", "eval.resolution=48"]


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dense") / "data"
    synthesize(root, 48, size=(48, 80), seed=1, num_classes=4, dense=True)
    return root


def _upload(folder: Path, bucket: str, prefix: str) -> str:
    client = boto3.client("s3")
    for p in folder.rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def test_evaluate_trained_student_then_gate(tiny_config: Path, dense_data: Path, tmp_path: Path, s3_bucket: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ["--config", str(tiny_config), "--data", str(dense_data)]
    # A real (very short) stage-3 run: its checkpoint holds the encoder and the adapters.
    assert main(["normalize", *cfg, "--stage", "3", "--random-proxy", "--out", str(tmp_path / "norm")]) == 0
    assert main(["train", *cfg, "--stage", "3", "--random-proxy", "--from-scratch", "--set", "stage3.iters=2", "--set", "stage3.warmup_iters=0",
                 "--norm", str(tmp_path / "norm/norm.safetensors"), "--out", str(tmp_path / "run")]) == 0
    ckpt = next((tmp_path / "run/checkpoints").glob("step_*/model.safetensors"))
    norm = tmp_path / "norm/norm.safetensors"

    out = tmp_path / "eval"
    assert main(["evaluate", *cfg, *FAST, "--encoder", "student", "--checkpoint", str(ckpt), "--norm", str(norm),
                 "--out", str(out)]) == 0
    ev = json.loads((out / "eval.json").read_text())
    for key in KEYS[:-1]:
        assert isinstance(ev[key], float), key
    assert 0 <= ev["knn_top1"] <= 1 and 0 <= ev["seg_miou"] <= 1 and 0 <= ev["keypoint_pck"] <= 1
    assert ev["depth_rmse"] > 0 and 0 <= ev["depth_delta1"] <= 1
    assert set(ev["fidelity"]) == {"proxy"} and -1 <= ev["fidelity"]["proxy"] <= 1
    assert ev["setup"]["num_train"] + ev["setup"]["num_heldout"] == 48 and ev["setup"]["resolution"] == 48
    assert ev["details"]["seg_num_classes"] == 5  # background + 4 shapes
    assert ev["details"]["keypoints"]["total"] > 0
    for name in PLOTS:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["step"] == "evaluate"
    assert set(KEYS) <= set(result["metrics"]) and result["artifacts"]["eval"] == "eval.json"  # relative to result.json
    assert "evaluate student" in capsys.readouterr().out

    # Statistics that do not describe this run's targets (computed at other sizes), sent into the complete run
    # above: refused in one line before --out is touched, which keeps that run byte for byte, with no claim.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["evaluate", *cfg, *FAST, "--set", "stage3.teacher_resolutions=[32,48]", "--encoder", "student",
                 "--checkpoint", str(ckpt), "--norm", str(norm), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"eupe: error: --norm {norm}: the statistics of proxy were computed with resolutions")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # Checkpoint, statistics and baseline from S3, gated against the run above: same numbers, the gate passes.
    s3 = {name: _upload(src, s3_bucket, name) for name, src in (("ckpt", ckpt.parent), ("norm", norm.parent), ("base", out))}
    gated = tmp_path / "gated"
    assert main(["evaluate", *cfg, *FAST, "--checkpoint", f"{s3['ckpt']}/model.safetensors",
                 "--norm", f"{s3['norm']}/norm.safetensors", "--baseline", f"{s3['base']}/eval.json",
                 "--out", str(gated)]) == 0
    again = json.loads((gated / "eval.json").read_text())
    assert gated_values(again) == pytest.approx(gated_values(ev))
    assert again["gate"]["passed"] and not again["gate"]["regressed"]

    # The same encoder without --checkpoint/--norm: the baseline's fidelity is missing, which fails by default.
    capsys.readouterr()
    partial = tmp_path / "partial"
    assert main(["evaluate", *cfg, *FAST, "--weights", str(ckpt), "--baseline", str(out / "eval.json"),
                 "--out", str(partial)]) == 3  # a gate failure, not bad input
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("eupe: error: quality gate failed") and "fidelity.proxy missing from this run" in err
    record = json.loads((partial / "eval.json").read_text())
    assert record["gate"]["missing"] == ["fidelity.proxy"] and record["gate"]["regressed"] == []

    # A planted regression: the production model was better at segmentation. Fails, names it, keeps the record.
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps({**{k: ev[k] for k in KEYS}, "seg_miou": ev["seg_miou"] + 0.2}))
    capsys.readouterr()
    failed = tmp_path / "failed"
    assert main(["evaluate", *cfg, *FAST, "--set", "eval.allow_missing_metrics=true", "--weights", str(ckpt),
                 "--baseline", str(planted), "--out", str(failed)]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("eupe: error: quality gate failed") and "\n" not in err
    assert "seg_miou dropped to" in err and f"baseline {ev['seg_miou'] + 0.2:.4f}" in err and "knn_top1" not in err
    assert "missing" not in err
    record = json.loads((failed / "eval.json").read_text())
    assert record["gate"]["regressed"] == ["seg_miou"] and record["fidelity"] is None
    assert record["gate"]["skipped"] == ["fidelity.proxy"] and record["gate"]["missing"] == []  # allowed: skipped
    status = json.loads((failed / "result.json").read_text())
    assert status["status"] == "failed" and status["metrics"]["gate_passed"] is False


def test_dense_labels_are_read_from_s3_like_from_disk(dense_data: Path, s3_bucket: str) -> None:
    from eupe.data.folder import open_source
    from eupe.evaluate.data import EvalImages, available_labels

    small = dense_data.parent / "small"
    if not small.exists():
        shutil.copytree(dense_data / "circle", small / "circle")
    local, remote = open_source(str(small)), open_source(_upload(small, s3_bucket, "small"))
    assert len(local) == len(remote) == 12  # images only: the .mask.png/.depth.png labels are not images
    labels = available_labels(remote, [0, 5])
    assert labels == {"mask": True, "depth": True} == available_labels(local, [0, 5])
    a, b = EvalImages(local, [5], 32, 16, labels)[0], EvalImages(remote, [5], 32, 16, labels)[0]
    assert a.keys() == b.keys() == {"image", "label", "skipped", "mask", "depth"}
    for key in ("image", "mask", "depth"):
        assert torch.equal(a[key], b[key])
    assert a["mask"].shape == (16, 16) and set(a["mask"].unique().tolist()) <= {0, 1, 2, 3, 4}
    assert 1.0 <= float(a["depth"].min()) and float(a["depth"].max()) <= 10.0  # metres


def test_bad_inputs_fail_in_one_line_before_any_output(tiny_config: Path, dense_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    cfg = ["--config", str(tiny_config), "--data", str(dense_data)]

    def fails(*argv: str) -> str:
        capsys.readouterr()
        assert main(["evaluate", *cfg, *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("eupe: error: ") and "\n" not in err  # nothing computed: no progress bar either
        assert (out / "keep.txt").read_text() == "earlier output"
        return err

    assert "--encoder 'nope'" in fails("--encoder", "nope")
    assert "--norm" in fails("--checkpoint", str(tmp_path / "model.safetensors"))
    assert "missing.safetensors" in fails("--weights", str(tmp_path / "missing.safetensors"))
    assert "--baseline" in fails("--baseline", str(tiny_config))  # YAML, not an eval.json
    # An encoder-only checkpoint (no adapters.*) with valid stage-3 statistics: refused before encoding.
    stats = FeatureStats(*(torch.ones(64) for _ in range(4)))
    save_stats(str(tmp_path / "norm.safetensors"), {"proxy": stats}, {"stage": 3})
    encoder_only = tmp_path / "encoder.safetensors"
    save_file({"encoder.unused": torch.zeros(1)}, str(encoder_only))
    err = fails("--checkpoint", str(encoder_only), "--norm", str(tmp_path / "norm.safetensors"))
    assert f"--checkpoint {encoder_only}: no adapter for target 'proxy' (adapters: none)" in err
    shard = tmp_path / "train-0000.tar"
    tarfile.open(shard, "w").close()
    assert f"data {shard}: evaluation needs an image folder" in fails("--data", str(shard))
    broken = tmp_path / "broken"
    shutil.copytree(dense_data, broken)
    victim = next(broken.rglob("*.mask.png"))
    victim.unlink()
    assert str(victim) in fails("--data", str(broken))
    rgb = next(broken.rglob("*.depth.png"))
    Image.new("RGB", Image.open(rgb).size).save(rgb)
    for m in broken.rglob("*.mask.png"):
        m.unlink()
    assert f"{rgb}: depth label must be a 16-bit PNG" in fails("--data", str(broken))


def test_masks_without_a_labelled_pixel_skip_segmentation(tiny_config: Path, dense_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "unlabelled"
    shutil.copytree(dense_data, data)
    for m in data.rglob("*.mask.png"):
        Image.new("L", Image.open(m).size, 255).save(m)  # every pixel eval.ignore_index
    out = tmp_path / "eval"
    assert main(["evaluate", "--config", str(tiny_config), "--data", str(data), *FAST, "--out", str(out)]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["seg_miou"] is None and "eval.ignore_index (255)" in ev["skipped"]["seg_miou"]
    assert isinstance(ev["depth_rmse"], float) and not (out / "seg_example.png").exists()


def test_weights_of_another_model_into_an_earlier_run_keep_it_whole(tiny_config: Path, dense_data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The encoder is built (its weights loaded) before --out is touched: an earlier evaluation's files stay
    byte for byte and no claim is left."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    (out / "result.json").write_text('{"step": "evaluate", "status": "ok"}')  # an earlier evaluation's: complete
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    assert main(["evaluate", "--config", str(tiny_config), "--data", str(dense_data), "--weights", str(foreign),
                 "--out", str(out)]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_compare_with_weights_of_another_model_into_an_earlier_run_keeps_it_whole(
        tiny_config: Path, dense_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every row's weights are checked against its model (names and shapes, nothing built or read) before --out
    is touched: an earlier comparison's files stay byte for byte, and nothing is encoded."""
    from eupe.config import load_config
    from eupe.models.registry import build_model

    proxy = tmp_path / "proxy.safetensors"
    spec = load_config(tiny_config).proxy.model_copy(update={"weights": None})
    save_file({k: v.contiguous() for k, v in build_model(spec).state_dict().items()}, str(proxy))
    out = tmp_path / "compare"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    (out / "result.json").write_text('{"step": "evaluate-compare", "status": "ok"}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    assert main(["evaluate", "--compare", "--config", str(tiny_config), "--data", str(dense_data), "--proxy",
                 str(proxy), "--weights", str(foreign), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"student.weights {foreign} does not fit" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
