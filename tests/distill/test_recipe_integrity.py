"""A run cannot be wired wrong (issue: recipe integrity): aligned token grids in every shipped config, the
paper's data mix, statistics bound to the weights they describe, no silent random models, and the
per-teacher summary vector recorded with the statistics."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eupe.cli import main
from eupe.commands import input_overrides
from eupe.config import load_config
from eupe.data.sources import Mixture, open_data
from eupe.distill.normalize import load_stats
from eupe.distill.targets import Target, prepare_for, student_spec, target_features, target_resolutions, target_specs
from eupe.models.adapter import resample_tokens
from eupe.models.features import extract_features, token_stride
from eupe.models.registry import build_model

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "latency_budgets.yaml")
TOLERANCE = 0.05  # of a token


def _meta_model(spec, field):
    """The real timm model of ``spec`` (full size for the paper's config), on the meta device: shapes only."""
    with torch.device("meta"):
        return build_model(spec.model_copy(update={"weights": None}), field)


def _centres(grid: int, stride: int, size: int) -> torch.Tensor:
    """Token centres in image coordinates (0..1) of a model that saw the image at ``size`` px."""
    return (torch.arange(grid, dtype=torch.float64) + 0.5) * stride / size


def _pairs():
    for path in SHIPPED:
        for stage in (1, 2, 3):
            yield pytest.param(path, stage, id=f"{path.stem}-stage{stage}")


@pytest.mark.parametrize("path,stage", list(_pairs()))
def test_every_student_token_is_compared_with_the_target_token_at_its_place(path, stage):
    """For each (student resolution, target, target resolution) of the stage: the sizes the training path
    feeds each model (prepare_for), the grids they give, and where resample_tokens takes each compared
    student value from. A ramp (each student token's value = its centre) resampled onto the target grid
    gives the image position each target token is compared with; inside the student centres' span it must
    be the target token's own centre within 0.05 token; outside it (a border ring under half a student
    token wide) the nearest student token. No token may see padding."""
    cfg = load_config(path)
    field, spec = student_spec(cfg, stage)
    student = _meta_model(spec, field)
    zeros = torch.zeros(1, 3, 1, 1, device="meta")
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device="meta")
    worst = 0.0
    for name, where, tspec, _ in target_specs(cfg, stage):
        target = Target(name, _meta_model(tspec, where), target_resolutions(cfg, stage, tspec), 1.0, zeros, zeros)
        for rs in cfg.stage(stage).resolutions:
            xs = prepare_for(student, images, rs, zeros, zeros)
            fs = extract_features(student, xs)
            for rt in target.resolutions:
                ft = target_features(target, images, rt)
                st_s, st_t, size_s = token_stride(student), token_stride(target.model), xs.shape[-1]
                size_t = ft.grid[0] * st_t  # the pixels its tokens span
                where_ = f"{path.name} stage{stage}: student {rs}px -> {name} {rt}px"
                # no padded tokens: each grid spans exactly the image it was given
                assert fs.grid[0] * st_s == size_s and fs.grid[0] == fs.grid[1], where_
                assert ft.grid[0] == ft.grid[1] and abs(size_t - round(rt / st_t) * st_t) == 0, where_
                cs, ct = _centres(fs.grid[0], st_s, size_s), _centres(ft.grid[0], st_t, size_t)
                ramp = cs.view(1, -1, 1).expand(-1, -1, fs.grid[0]).reshape(1, -1, 1)  # row coordinate per token
                compared = resample_tokens(ramp.float(), fs.grid, ft.grid).view(ft.grid)[:, 0].double()
                inside = (ct >= cs[0]) & (ct <= cs[-1])
                err = (compared - ct).abs() * fs.grid[0]  # in student tokens
                finer = max(fs.grid[0], ft.grid[0])
                err_inside = (compared[inside] - ct[inside]).abs() * finer  # in tokens of the finer grid
                assert err_inside.max() <= TOLERANCE, f"{where_}: off by {err_inside.max():.3f} token"
                assert (err[~inside] < 0.5).all(), f"{where_}: a border token is not compared with its nearest"
                worst = max(worst, float(err_inside.max()))
    print(f"{path.name} stage{stage}: worst misalignment {worst:.2e} token")


def test_the_paper_config_trains_on_the_papers_mix(tmp_path):
    """90% LVD + 10% IN-1k, each with its domain; the mixture is what training opens."""
    from eupe.data.synth import synthesize

    cfg = load_config(ROOT / "configs" / "eupe_vit_b.yaml")
    assert [(s.weight, s.domain) for s in cfg.data.sources] == [(0.9, "lvd"), (0.1, "in1k")]
    for name in ("lvd", "in1k"):
        synthesize(tmp_path / name, 10, size=(32, 40), seed=len(name), num_classes=2)
    local = cfg.data.model_copy(update={"sources": [s.model_copy(update={"uri": str(tmp_path / s.domain)})
                                                    for s in cfg.data.sources]})
    mixed = open_data(local)
    assert isinstance(mixed, Mixture) and mixed.shares == pytest.approx([0.9, 0.1]) and mixed.domains == ["lvd", "in1k"]


def test_data_flag_replaces_a_mixture_with_a_warning_naming_the_dropped_sources(caplog):
    args = argparse.Namespace(config=str(ROOT / "configs" / "eupe_vit_b.yaml"), overrides=[], data="/my/data", proxy=None)
    with caplog.at_level(logging.WARNING, logger="eupe"):
        cfg = load_config(args.config, input_overrides(args))
    assert cfg.data.sources == [] and cfg.data.root == "/my/data"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "/data/lvd (weight 0.9, domain lvd)" in warning and "/data/imagenet-1k/train (weight 0.1, domain in1k)" in warning


@pytest.fixture(scope="module")
def stage2_random(tmp_path_factory, tiny_data):
    """The tiny recipe and stage-2 statistics of its seeded random proxy."""
    from conftest import TINY_RECIPE

    root = tmp_path_factory.mktemp("integrity")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_RECIPE.format(data=tiny_data))
    assert main(["normalize", "--config", str(cfg), "--stage", "2", "--random-proxy", "--out", str(root / "norm2")]) == 0
    return cfg, root / "norm2" / "norm.safetensors"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_statistics_of_a_random_proxy_are_refused_with_trained_weights(stage2_random, tmp_path, capsys):
    cfg, norm = stage2_random
    _, meta = load_stats(str(norm))
    random_digest = meta["targets"]["proxy"]["weights"]
    proxy = build_model(load_config(cfg).proxy, "proxy")
    with torch.no_grad():
        for p in proxy.parameters():
            p.add_(0.01)  # "trained": other weights of the same shapes
    weights = tmp_path / "proxy.safetensors"
    save_file({k: v.contiguous() for k, v in proxy.state_dict().items()}, str(weights))
    capsys.readouterr()
    code = main(["train", "--config", str(cfg), "--stage", "2", "--proxy", str(weights), "--norm", str(norm),
                 "--out", str(tmp_path / "run")])
    err = _one_line(capsys)
    assert code == 2 and random_digest in err and "this run's proxy has weights sha256:" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_other_statistics_is_refused_naming_both(stage2_random, tmp_path, capsys):
    cfg, norm = stage2_random
    out = tmp_path / "run"
    base = ["train", "--config", str(cfg), "--stage", "2", "--random-proxy", "--out", str(out),
            "--set", "stage2.checkpoint_every=2", "--set", "stage2.warmup_iters=0"]
    assert main([*base, "--norm", str(norm), "--set", "stage2.iters=2"]) == 0
    assert main(["normalize", "--config", str(cfg), "--stage", "2", "--random-proxy", "--set",
                 "normalization.num_images=16", "--out", str(tmp_path / "other")]) == 0
    other = tmp_path / "other" / "norm.safetensors"
    capsys.readouterr()
    assert main([*base, "--norm", str(other), "--set", "stage2.iters=2", "--resume"]) == 2
    err = _one_line(capsys)
    from eupe.fingerprint import digest

    assert digest(str(norm)) in err and digest(str(other)) in err and "normalization statistics" in err, err


def test_no_silent_random_models(stage2_random, tmp_path, capsys):
    cfg, norm = stage2_random
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--stage", "2", "--norm", str(norm), "--out", str(tmp_path / "a")]) == 2
    assert "no proxy weights are given: pass --proxy" in _one_line(capsys)
    assert main(["normalize", "--config", str(cfg), "--stage", "3", "--out", str(tmp_path / "n")]) == 2
    assert "--random-proxy" in _one_line(capsys)
    assert main(["train", "--config", str(cfg), "--stage", "3", "--random-proxy", "--norm", str(norm),
                 "--out", str(tmp_path / "b")]) == 2
    assert "stage 3 fine-tunes the stage-2 student: pass --init" in _one_line(capsys)
    assert not any((tmp_path / d).exists() for d in ("a", "n", "b"))


def test_the_summary_choice_is_recorded_with_the_statistics_and_training_holds_to_it(tiny_config, tmp_path, capsys):
    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--set", "teachers.0.summary=mean",
                 "--out", str(tmp_path / "norm")]) == 0
    norm = tmp_path / "norm" / "norm.safetensors"
    _, meta = load_stats(str(norm))
    # pecore (PE-core geometry: no class token) as asked; dinov3 by default: its class token
    assert meta["targets"]["pecore"]["summary"] == "mean" and meta["targets"]["dinov3"]["summary"] == "cls"
    assert meta["targets"]["pecore"]["input_sizes"] == [56] and meta["targets"]["dinov3"]["resolutions"] == [48]
    capsys.readouterr()
    assert main(["train", "--config", str(tiny_config), "--stage", "1", "--norm", str(norm),
                 "--out", str(tmp_path / "run")]) == 2  # the config's pecore summary is auto -> pool
    assert "the statistics of pecore were computed with summary mean, this run uses pool" in _one_line(capsys)
    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--set", "teachers.0.summary=cls",
                 "--out", str(tmp_path / "cls")]) == 2
    err = _one_line(capsys)
    assert "teachers.0.summary:" in err and "has no class token" in err, err


def test_pe_summaries_are_what_the_recipe_table_says():
    """pool = PE-core's attention pool before the projection, mean = the mean patch token, cls = the class token."""
    from eupe.config import ModelSpec

    kw = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    x = torch.rand(2, 3, 28, 28)
    core = build_model(ModelSpec(model="vit_pe_core_gigantic_patch14_448", img_size=28, kwargs=kw, summary="pool")).eval()
    f = extract_features(core, x)
    out = core.forward_features(x)
    assert torch.allclose(f.cls, core.fc_norm(core.attn_pool(out)))  # before core.head (the projection)
    lang = build_model(ModelSpec(model="vit_pe_lang_gigantic_patch14_448", img_size=28, kwargs=kw, summary="mean")).eval()
    out = lang.forward_features(x)
    assert torch.allclose(extract_features(lang, x).cls, out[:, lang.num_prefix_tokens:].mean(1))
    dino = build_model(ModelSpec(model="vit_huge_plus_patch16_dinov3", img_size=32, kwargs=kw, summary="cls")).eval()
    y = torch.rand(2, 3, 32, 32)
    assert torch.equal(extract_features(dino, y).cls, dino.forward_features(y)[:, 0])
