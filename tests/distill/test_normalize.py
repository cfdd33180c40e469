import json
import hashlib

import pytest
import torch

from eupe import storage
from eupe.cli import main
from eupe.distill.normalize import FeatureStats, StatsAccumulator, load_stats, save_stats
from eupe.errors import EupeError
from reference import standardize


def _stats_of(cls, patches, eps=1e-6):
    acc = StatsAccumulator()
    acc.add("cls", cls)
    acc.add("patch", patches)
    return acc.stats(eps)


def test_stats_match_torch_mean_and_std():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(64, 12, generator=g) * 3 + 5
    patches = torch.randn(64, 16, 20, generator=g) * 0.5 - 2
    s = _stats_of(cls, patches)
    torch.testing.assert_close(s.cls_mean, cls.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cls_std, cls.std(0, unbiased=False) + 1e-6, rtol=1e-4, atol=1e-5)
    flat = patches.reshape(-1, 20)
    torch.testing.assert_close(s.patch_mean, flat.mean(0), rtol=1e-5, atol=1e-5)
    n_cls, n_patch = s.apply(cls, patches)
    assert n_cls.mean(0).abs().max() < 1e-4 and (n_cls.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert n_patch.reshape(-1, 20).mean(0).abs().max() < 1e-4


def test_stats_stay_frozen_when_a_second_batch_is_normalized():
    first = _stats_of(torch.randn(32, 8), torch.randn(32, 4, 8))
    before = {k: v.clone() for k, v in first.__dict__.items()}
    second_cls, second_patch = torch.randn(32, 8) * 10 + 3, torch.randn(32, 4, 8) * 10 + 3
    out_cls, _ = first.apply(second_cls, second_patch)
    for k, v in first.__dict__.items():
        assert torch.equal(v, before[k]), k
    # the second batch is normalized with the first batch's numbers, not its own
    torch.testing.assert_close(out_cls, (second_cls - before["cls_mean"]) / before["cls_std"])
    with pytest.raises(Exception):  # frozen dataclass: no way to update it in place by assignment
        first.cls_mean = torch.zeros(8)


def test_round_trip_through_the_artifact_is_exact(tmp_path):
    stats = {"pecore": _stats_of(torch.randn(16, 6), torch.randn(16, 9, 10)),
             "dinov3": _stats_of(torch.randn(16, 7), torch.randn(16, 4, 5))}
    path = tmp_path / "norm.safetensors"
    save_stats(str(path), stats, {"images": ["a.jpg", "b.jpg"]})
    loaded, meta = load_stats(str(path))
    assert meta == {"images": ["a.jpg", "b.jpg"]}
    assert set(loaded) == set(stats)
    for name, s in stats.items():
        for k, v in s.__dict__.items():
            assert torch.equal(getattr(loaded[name], k), v), (name, k)


def test_corrupt_artifact_is_named(tmp_path):
    path = tmp_path / "norm.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(EupeError, match="norm.safetensors"):
        load_stats(str(path))


def test_normalize_step_records_images_and_training_leaves_stats_untouched(tiny_config, tmp_path):
    out = tmp_path / "norm1"
    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--out", str(out)]) == 0
    stats, meta = load_stats(str(out / "norm.safetensors"))
    assert set(stats) == {"pecore", "dinov3"}
    assert stats["pecore"].dims == (48, 48) and stats["dinov3"].dims == (40, 40)
    assert meta["num_images"] == 32 and len(set(meta["images"])) == 32
    digest = hashlib.sha256((out / "norm.safetensors").read_bytes()).hexdigest()
    assert main(["train", "--config", str(tiny_config), "--stage", "1", "--set", "stage1.iters=3",
                 "--norm", str(out / "norm.safetensors"), "--out", str(tmp_path / "s1")]) == 0
    assert hashlib.sha256((out / "norm.safetensors").read_bytes()).hexdigest() == digest
    # re-running the step gives the same statistics (idempotent)
    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--out", str(tmp_path / "again")]) == 0
    assert hashlib.sha256((tmp_path / "again" / "norm.safetensors").read_bytes()).hexdigest() == digest


def test_apply_is_x_minus_mean_over_std_for_class_and_patch_tokens():
    g = torch.Generator().manual_seed(3)
    stats = FeatureStats(cls_mean=torch.randn(6, generator=g), cls_std=torch.rand(6, generator=g) * 3 + 0.1,
                         patch_mean=torch.randn(4, generator=g), patch_std=torch.rand(4, generator=g) * 3 + 0.1)
    cls, patches = torch.randn(5, 6, generator=g), torch.randn(5, 7, 4, generator=g)
    n_cls, n_patch = stats.apply(cls, patches)
    torch.testing.assert_close(n_cls, standardize(cls, stats.cls_mean, stats.cls_std))
    torch.testing.assert_close(n_patch, standardize(patches, stats.patch_mean, stats.patch_std))
    assert stats.dims == (6, 4)
    # bf16 features (autocast) are normalized in fp32
    b_cls, b_patch = stats.apply(cls.bfloat16(), patches.bfloat16())
    assert b_cls.dtype == b_patch.dtype == torch.float32
    torch.testing.assert_close(b_patch, standardize(patches.bfloat16().float(), stats.patch_mean, stats.patch_std))


def test_std_adds_eps_and_constant_channels_do_not_divide_by_zero():
    cls = torch.tensor([[1.0, 5.0], [3.0, 5.0]])  # channel 0: mean 2, std 1; channel 1 constant
    patches = torch.tensor([[[0.0], [4.0]], [[2.0], [2.0]]])  # one channel: mean 2, population std sqrt(2)
    s = _stats_of(cls, patches, eps=0.5)
    torch.testing.assert_close(s.cls_mean, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(s.cls_std, torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(s.patch_mean, torch.tensor([2.0]))
    torch.testing.assert_close(s.patch_std, torch.tensor([2.0**0.5 + 0.5]))


def test_stats_accumulated_in_chunks_equal_one_pass():
    g = torch.Generator().manual_seed(4)
    cls, patches = torch.randn(12, 5, generator=g) * 2 + 1, torch.randn(12, 3, 4, generator=g) - 3
    whole = _stats_of(cls, patches)
    acc = StatsAccumulator()
    for part in (slice(0, 5), slice(5, 9), slice(9, 12)):
        acc.add("cls", cls[part])
        acc.add("patch", patches[part])
    chunked = acc.stats(1e-6)
    for k, v in whole.__dict__.items():
        torch.testing.assert_close(getattr(chunked, k), v, rtol=1e-5, atol=1e-6, msg=k)
    assert chunked.cls_mean.dtype == torch.float32


def test_load_stats_without_metadata_with_dotted_names_and_a_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    s = _stats_of(torch.randn(8, 3), torch.randn(8, 2, 3))
    tensors = {f"teachers.0.{f}": getattr(s, f) for f in ("cls_mean", "cls_std", "patch_mean", "patch_std")}
    save_file(tensors, str(tmp_path / "plain.safetensors"))  # no "eupe" metadata: an empty record
    stats, meta = load_stats(str(tmp_path / "plain.safetensors"))
    assert meta == {} and list(stats) == ["teachers.0"] and torch.equal(stats["teachers.0"].cls_std, s.cls_std)
    del tensors["teachers.0.patch_std"]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(EupeError, match=r"partial\.safetensors: missing tensor 'teachers\.0\.patch_std'"):
        load_stats(str(tmp_path / "partial.safetensors"))


def test_normalize_step_equals_the_statistics_of_its_images_centre_cropped(tiny_config, tmp_path):
    """The step's numbers, recomputed here from the images it lists: resize + centre crop (no training
    augmentation) at the largest resolution, each target at each of its resolutions."""
    from eupe.config import load_config
    from eupe.data.loader import DistillImages
    from eupe.data.sources import open_data
    from eupe.distill.targets import build_targets, target_features

    out = tmp_path / "norm1"
    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--out", str(out)]) == 0
    result = storage.read_result(out)  # artifact paths resolved (written relative to result.json)
    assert result["step"] == "normalize-stage1" and result["artifacts"]["stats"] == str(out / "norm.safetensors")
    m = result["metrics"]
    assert (m["num_images"], m["selection"], m["manifest"], m["strata"]) == (32, "random", None, None)
    assert m["dims"] == {"pecore": {"cls": 48, "patch": 48}, "dinov3": {"cls": 40, "patch": 40}}
    stats, meta = load_stats(str(out / "norm.safetensors"))
    assert meta["stage"] == 1 and meta["resolutions"] == {"pecore": [56], "dinov3": [48]}

    cfg = load_config(tiny_config)
    source = open_data(cfg.data, cfg.seed)
    index = {source.uri(i): i for i in range(len(source))}
    images = torch.stack([DistillImages(source, 56, train=False)[index[u]][0] for u in meta["images"]])
    for t in build_targets(cfg, 1, torch.device("cpu")):
        f = target_features(t, images, t.resolutions[0])
        expected = _stats_of(f.cls, f.patches, eps=cfg.normalization.eps)
        for k, v in expected.__dict__.items():
            torch.testing.assert_close(getattr(stats[t.name], k), v, rtol=1e-4, atol=1e-5, msg=f"{t.name}.{k}")


@pytest.mark.parametrize("bad", ["manifest", "weights"])
def test_bad_input_into_an_earlier_run_keeps_it_whole(tiny_config, tmp_path, capsys, bad):
    """A --manifest and the target weights are read before --out is touched: an earlier run's files stay byte for
    byte and no claim is left."""
    from safetensors.torch import save_file

    out = tmp_path / "norm"
    argv = ["normalize", "--config", str(tiny_config), "--stage", "1", "--out", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if bad == "manifest":
        (tmp_path / "m.parquet").write_text("not a parquet file")
        extra, expected = ["--manifest", str(tmp_path / "m.parquet")], "cannot read manifest"
    else:
        save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
        extra, expected = ["--set", f"teachers.0.weights={tmp_path / 'w.safetensors'}"], "does not fit"
    capsys.readouterr()
    assert main(argv + extra) == 2
    assert expected in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
