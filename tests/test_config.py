from pathlib import Path

import pytest

from eupe.config import Config, dump_config, load_config
from eupe.errors import EupeError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_numbers():
    cfg = Config()
    assert [t.model for t in cfg.teachers] == [
        "vit_pe_core_gigantic_patch14_448", "vit_pe_lang_gigantic_patch14_448", "vit_huge_plus_patch16_dinov3"]
    assert cfg.stage1.adapter_hidden == 1536
    assert cfg.stage2.adapter_hidden == cfg.stage3.adapter_hidden == 3072
    assert (cfg.loss.cls_cosine, cfg.loss.patch_cosine, cfg.loss.patch_smooth_l1) == (1.0, 0.9, 0.1)
    assert cfg.stage2.lr == 2e-5 and cfg.stage2.weight_decay == 1e-4
    assert cfg.stage2.iters == 390_000 and cfg.stage3.iters == 100_000 and cfg.stage2.batch_size == 8192
    assert cfg.stage2.resolutions == [256]
    assert cfg.stage3.resolutions == cfg.stage3.teacher_resolutions == [256, 384, 512]


@pytest.mark.parametrize("name", ["demo.yaml", "eupe_vit_b.yaml"])
def test_shipped_recipes_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.stage3.resolutions[0] <= cfg.stage3.resolutions[-1]
    assert load_config(ROOT / "configs" / name) == cfg  # deterministic


def test_vit_b_recipe_uses_real_teacher_names():
    cfg = load_config(ROOT / "configs" / "eupe_vit_b.yaml")
    assert {t.model for t in cfg.teachers} == {
        "vit_pe_core_gigantic_patch14_448", "vit_pe_lang_gigantic_patch14_448", "vit_huge_plus_patch16_dinov3"}


def test_overrides_reach_nested_fields_and_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage2: {lr: 3.0e-4}\n")  # a partial section keeps the other defaults
    cfg = load_config(path, ["stage2.lr=1e-4", "teachers.1.img_size=224", "stage3.resolutions=[128, 256]"])
    assert cfg.stage2.lr == 1e-4 and cfg.stage2.iters == 390_000
    assert cfg.teachers[1].img_size == 224
    assert cfg.stage3.resolutions == [128, 256]


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["stage1.lr=0.5"])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, field",
    [
        ("stage2.lr=-1", "stage2.lr"),
        ("stage3.resolutions=[]", "stage3.resolutions"),
        ("stage2.learning_rate=1", "stage2.learning_rate"),
        ("stage1.iters=many", "stage1.iters"),
        ("stage2.teacher_resolutions=[0]", "stage2.teacher_resolutions"),
        ("data.crop_scale=[0.9, 0.1]", "data.crop_scale"),
        ("teachers.0.name=pelang_g", "teachers"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_field(override, field):
    with pytest.raises(EupeError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{field}'" in msg and "\n" not in msg


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage2:\n  lr: 1.0e-4\n  lrr: 2\n")
    with pytest.raises(EupeError, match=r"bad\.yaml: config field 'stage2\.lrr': unknown key"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(EupeError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(EupeError, match=r"broken\.yaml: invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize("text, says", [
    ("stage2:\n  iters: 10\nstage2:\n  lr: 0.1\n", r"invalid YAML at line 3: duplicate key 'stage2' \(first at line 1\)"),
    ("stage2: {iters: 10, iters: 20}\n", r"invalid YAML at line 1: duplicate key 'iters' \(first at line 1\)"),
], ids=["block", "flow"])
def test_a_key_given_twice_is_refused_not_silently_the_last(tmp_path, text, says):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(EupeError, match=rf"twice\.yaml: {says}"):
        load_config(path)
    from eupe.export.budgets import load_budgets

    rows = tmp_path / "budgets.yaml"
    rows.write_text("device_classes:\n  cpu:\n    models:\n      m:\n        64: {budget_ms: 1}\n        64: {budget_ms: 9}\n")
    with pytest.raises(EupeError, match=r"budgets\.yaml: invalid YAML at line 6: duplicate key 64 \(first at line 5\)"):
        load_budgets(str(rows))


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    from eupe.cli import main

    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"eupe: error: {path}: not a text (YAML) file"


def test_the_held_out_images_follow_eval_split_seed_not_the_training_seed():
    from eupe.config import EvalConfig
    from eupe.evaluate.data import split

    def held(cfg: EvalConfig, seed: int) -> list[int]:
        return split(200, cfg.max_images, cfg.heldout_fraction, cfg.split_seed_for(seed)).heldout

    assert held(EvalConfig(), 1) != held(EvalConfig(), 2)  # unset: the recipe's seed draws them
    pinned = EvalConfig(split_seed=5)
    assert held(pinned, 1) == held(pinned, 2) == held(EvalConfig(), 5)
