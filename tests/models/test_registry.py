import boto3
import pytest
import torch
from safetensors.torch import save_file

from eupe.config import ModelSpec
from eupe.errors import EupeError
from eupe.models import STUDENTS, TargetAdapter, build_model, extract_features, resample_tokens

TINY = {
    "pecore": ModelSpec(model="vit_pe_core_gigantic_patch14_448", img_size=56, kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}),
    "pelang": ModelSpec(model="vit_pe_lang_gigantic_patch14_448", img_size=56, kwargs={"embed_dim": 24, "depth": 1, "num_heads": 2}),
    "dinov3": ModelSpec(model="vit_huge_plus_patch16_dinov3", img_size=64, kwargs={"embed_dim": 40, "depth": 1, "num_heads": 2}),
    "vit_t": ModelSpec(model="vit_t", img_size=64, kwargs={"depth": 1}),
    "convnext_t": ModelSpec(model="convnext_t", img_size=64, kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}),
}


def test_student_aliases_are_timm_models():
    import timm

    assert set(STUDENTS) == {"vit_t", "vit_s", "vit_b", "convnext_t", "convnext_b"}
    assert all(timm.is_model(n) for n in STUDENTS.values())


@pytest.mark.parametrize(
    "key, size, cls_dim, patch_dim, grid",
    [
        ("pecore", 56, 32, 32, (4, 4)),  # no class token: attention-pooled summary
        ("pelang", 70, 24, 24, (5, 5)),
        ("dinov3", 64, 40, 40, (4, 4)),  # class + 4 register tokens dropped from the patches
        ("dinov3", 72, 40, 40, (5, 5)),  # 72 is not a multiple of 16: padded
        ("vit_t", 96, 192, 192, (6, 6)),  # any size: position embeddings interpolated
        ("convnext_t", 64, 32, 32, (2, 2)),  # pooled vector + last feature map as tokens
    ],
)
def test_features_for_every_family(key, size, cls_dim, patch_dim, grid):
    model = build_model(TINY[key]).eval()
    f = extract_features(model, torch.randn(2, 3, size, size))
    assert f.cls.shape == (2, cls_dim)
    assert f.patches.shape == (2, grid[0] * grid[1], patch_dim)
    assert f.grid == grid


def test_class_token_is_the_first_token_when_the_model_has_one():
    model = build_model(TINY["dinov3"]).eval()
    x = torch.randn(1, 3, 64, 64)
    tokens = model.forward_features(x)
    f = extract_features(model, x)
    assert torch.equal(f.cls, tokens[:, 0]) and torch.equal(f.patches, tokens[:, model.num_prefix_tokens:])


def test_adapter_maps_to_target_dims_and_grid():
    adapter = TargetAdapter((48, 40), (32, 64), hidden=16)
    assert [type(m).__name__ for m in adapter.patch] == ["Linear", "LayerNorm", "GELU", "Linear"]
    from eupe.models.features import Features

    feats = Features(torch.randn(3, 48), torch.randn(3, 16 * 16, 40), (16, 16))
    cls, patches = adapter(feats, (32, 32))  # student 256px/16 -> teacher 448px/14
    assert cls.shape == (3, 32) and patches.shape == (3, 32 * 32, 64)


def test_resample_tokens_is_bilinear_on_the_grid():
    # a horizontal ramp stays a ramp; identity when the grids agree
    ramp = torch.linspace(0, 1, 4).repeat(4).view(1, 16, 1)
    up = resample_tokens(ramp, (4, 4), (8, 8)).view(8, 8)
    assert torch.all(up[:, 1:] >= up[:, :-1]) and torch.allclose(up[0], up[5])
    assert resample_tokens(ramp, (4, 4), (4, 4)) is ramp


def test_unknown_model_name_is_one_line():
    with pytest.raises(EupeError, match=r"student\.model: unknown timm model 'vit_nonexistent_patch16'"):
        build_model(ModelSpec(model="vit_nonexistent_patch16"), "student")


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(EupeError, match=f"checkpoint not found: {missing}"):
        build_model(TINY["vit_t"].model_copy(update={"weights": str(missing)}), "student")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_weights_load_from_local_files(tmp_path, fmt):
    src = build_model(TINY["dinov3"])
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save({"model": src.state_dict()}, path)  # wrapped, as many trainers save it
    loaded = build_model(TINY["dinov3"].model_copy(update={"weights": str(path)}))
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(TINY["vit_t"]).state_dict().items()}, str(path))
    with pytest.raises(EupeError, match=r"other\.safetensors does not fit"):
        build_model(TINY["dinov3"].model_copy(update={"weights": str(path)}), "teachers.2")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_check_fits_reads_names_and_shapes_without_building_or_loading(tmp_path, fmt):
    """check_fits: the same verdict as loading, from the file's header against a meta-device model."""
    from eupe.models.registry import check_fits

    def write(state: dict, name: str) -> str:
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save({"model": state}, path)
        return str(path)

    state = build_model(TINY["dinov3"]).state_dict()
    ok = write({f"encoder.{k}": v for k, v in state.items()} | {"adapters.x.weight": torch.zeros(2)}, "ours")
    check_fits(TINY["dinov3"].model_copy(update={"weights": ok}), "teachers.2")  # our checkpoint: encoder.* alone
    wrong = dict(state)
    wrong["patch_embed.proj.weight"] = torch.zeros(40, 3, 8, 8)  # patch 8, not 16
    with pytest.raises(EupeError, match=r"teachers\.2\.weights .* does not fit Eva: 0 missing .* 0 unexpected .* 1 of another shape \(e\.g\. \['patch_embed\.proj\.weight'\]\)"):
        check_fits(TINY["dinov3"].model_copy(update={"weights": write(wrong, "wrong")}), "teachers.2")
    other = write(build_model(TINY["vit_t"]).state_dict(), "other")
    with pytest.raises(EupeError, match=r"does not fit"):
        check_fits(TINY["dinov3"].model_copy(update={"weights": other}), "teachers.2")
    check_fits(TINY["dinov3"], "teachers.2")  # no weights: nothing to check


def test_weights_load_from_s3(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("EUPE_CACHE", str(tmp_path / "cache"))
    src = build_model(TINY["pecore"])
    path = tmp_path / "pecore.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    boto3.client("s3").upload_file(str(path), s3_bucket, "models/pecore.safetensors")
    loaded = build_model(TINY["pecore"].model_copy(update={"weights": f"s3://{s3_bucket}/models/pecore.safetensors"}))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(EupeError, match=f"s3://{s3_bucket}/models/missing.safetensors"):
        build_model(TINY["pecore"].model_copy(update={"weights": f"s3://{s3_bucket}/models/missing.safetensors"}))


class _RunsCode:
    """Unpickling this calls ``os.system(command)``: what a malicious ``.pt`` checkpoint carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def _malicious_checkpoint(tmp_path):
    """A ``.pt`` that looks like a state dict and, unpickled without ``weights_only``, touches a marker file."""
    import shlex

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"pos_embed": torch.zeros(1), "payload": _RunsCode(f"touch {shlex.quote(str(marker))}")}}, path)
    return path, marker


def test_malicious_pickle_is_refused_without_running_it(tmp_path, tiny_config, capsys):
    from eupe.cli import main
    from eupe.models.registry import read_state_dict

    evil, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(EupeError) as err:
        read_state_dict(str(evil))
    msg = str(err.value)
    assert msg.startswith(f"cannot read weights {evil}: UnpicklingError: ") and "\n" not in msg, msg
    assert not marker.exists()

    # as the configured weights of a teacher, through the CLI: exit 2, one line, the payload never runs
    code = main(["normalize", "--config", str(tiny_config), "--stage", "1", "--set", f"teachers.0.weights={evil}",
                 "--out", str(tmp_path / "norm")])
    err_text = capsys.readouterr().err.strip()
    assert code == 2
    assert err_text.startswith(f"eupe: error: cannot read weights {evil}: UnpicklingError: ") and "\n" not in err_text
    assert not marker.exists() and not (tmp_path / "norm").exists()

    # the file really is malicious: an unsafe load runs the payload
    torch.load(evil, weights_only=False)
    assert marker.exists()
