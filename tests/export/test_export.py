"""`eupe export`: .pte per resolution, parity against eager PyTorch in the ExecuTorch runtime, int8 PTQ
(dynamic by default, static on request), every operator inside XNNPACK, one program with a method per
resolution, the delegation and parity gates, and input errors before any compute."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from eupe.config import load_config
from eupe.data.folder import open_source
from eupe.data.loader import DistillImages
from eupe.distill.targets import model_inputs, prepare
from eupe.errors import EupeError
from eupe.export.export import run_export
from eupe.models.features import extract_features
from eupe.models.registry import build_model

VIT = ["student.model=vit_t", "student.img_size=64", "student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]
CONVNEXT = ["student.model=convnext_t", "student.img_size=64",
            "student.kwargs={dims: [16, 24, 32, 48], depths: [1, 1, 1, 1]}"]
FAST = ["export.parity_images=2", "export.calibration_images=8"]


def _config(tiny_data: Path, weights: Path, *overrides: str):
    return load_config(None, [f"data.root={tiny_data}", f"student.weights={weights}", *FAST, *overrides])


def _trained_weights(path: Path, model_overrides: list[str]) -> Path:
    """A checkpoint as the trainer writes it: ``encoder.*`` plus adapters, which export must drop."""
    spec = load_config(None, model_overrides).student
    torch.manual_seed(0)
    state = {f"encoder.{k}": v.contiguous() for k, v in build_model(spec).state_dict().items()}
    state["adapters.proxy.cls.0.weight"] = torch.randn(4, 4)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trained_weights(tmp_path_factory.mktemp("vit") / "encoder.safetensors", VIT)


def _run_pte(pte: str, x: torch.Tensor) -> list[torch.Tensor]:
    from executorch.runtime import Runtime

    return list(Runtime.get().load_program(Path(pte)).load_method("forward").execute([x]))


def _eager(cfg, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        f = extract_features(build_model(cfg.student).eval(), x)
    return [f.cls, f.patches]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_vit_export_fp32_and_int8_match_eager(tmp_path: Path, tiny_data: Path, vit_weights: Path):
    # trained at 64 px, shipped at 32: the position embedding is resampled for the static graph
    cfg = _config(tiny_data, vit_weights, *VIT, "export.resolutions=[32]", "export.int8_min_cosine=0.9")
    out = tmp_path / "export"
    result = run_export(cfg, out)
    report = json.loads((out / "export.json").read_text())
    fp32, int8 = report["models"]["student_32px_fp32"], report["models"]["student_32px_int8"]
    for m in (fp32, int8):
        assert m["input_shape"] == [1, 3, 32, 32] and m["bytes"] == Path(m["pte"]).stat().st_size > 0
        assert m["export_s"] > 0 and m["passed"]
    assert fp32["dtype"] == "fp32" and fp32["parity_cosine"] >= 0.999 and fp32["parity_max_abs"] < 1e-3
    assert int8["dtype"] == "int8" and int8["parity_cosine"] >= 0.9
    assert int8["bytes"] < 0.5 * fp32["bytes"]  # int8 weights
    # every operator runs inside XNNPACK, in one delegate: LayerNorm, GELU, softmax and attention included
    assert fp32["non_delegated_ops"] == int8["non_delegated_ops"] == {}
    assert fp32["xnnpack_subgraphs"] == int8["xnnpack_subgraphs"] == 1
    assert report["int8_activations"] == "dynamic" and report["calibration_images"] == 0
    assert result["status"] == "ok" and result["metrics"]["parity_cosine_fp32"] >= 0.999
    assert (out / "export.png").stat().st_size > 0 and (out / "result.json").is_file()

    # the .pte on disk runs in the ExecuTorch runtime and matches the eager model built from the checkpoint
    x = torch.randn(1, 3, 32, 32)
    ref = _eager(cfg, x)
    got = _run_pte(fp32["pte"], x)
    assert [g.shape for g in got] == [r.shape for r in ref] == [torch.Size([1, 32]), torch.Size([1, 4, 32])]
    assert min(_cos(g, r) for g, r in zip(got, ref)) >= 0.999
    got8 = _run_pte(int8["pte"], x)
    assert min(_cos(g, r) for g, r in zip(got8, ref)) >= 0.8

    # export.json's parity is the lowest per-image cosine, over both outputs, of the .pte against eager
    # PyTorch on the last 2 dataset images: recomputed here from the files on disk
    source = open_source(str(tiny_data))
    model = build_model(cfg.student).eval()
    images = torch.stack([DistillImages(source, 32, train=False)[i][0] for i in (len(source) - 2, len(source) - 1)])
    batch = prepare(images, 32, *model_inputs(model, torch.device("cpu")))
    ref = _eager(cfg, batch)
    for m in (fp32, int8):
        got = [_run_pte(m["pte"], batch[i : i + 1]) for i in range(2)]
        cosines = [_cos(got[i][k], ref[k][i : i + 1]) for i in range(2) for k in range(2)]
        assert m["parity_cosine"] == pytest.approx(min(cosines), abs=1e-6)
    assert int8["parity_cosine"] < 0.99999  # int8 is not exact: the comparison above is not 1 == 1


def test_convnext_export_and_the_parity_gate(tmp_path: Path, tiny_data: Path):
    weights = _trained_weights(tmp_path / "convnext.safetensors", CONVNEXT)
    # fp32 must match; an int8 bound of 1.0 cannot be met, so the step fails after writing export.json
    cfg = _config(tiny_data, weights, *CONVNEXT, "export.resolutions=[64]", "export.int8_min_cosine=1.0")
    out = tmp_path / "export"
    with pytest.raises(EupeError) as err:
        run_export(cfg, out)
    msg = str(err.value)
    assert "\n" not in msg and str(out / "export.json") in msg
    assert "student_64px_int8: parity cosine" in msg and "< 1.0 (export.int8_min_cosine)" in msg
    assert "student_64px_fp32" not in msg
    models = json.loads((out / "export.json").read_text())["models"]
    assert models["student_64px_fp32"]["passed"] and not models["student_64px_int8"]["passed"]
    assert 0.5 < models["student_64px_int8"]["parity_cosine"] < 1.0
    m = models["student_64px_fp32"]
    assert m["input_shape"] == [1, 3, 64, 64] and m["parity_cosine"] >= 0.999
    x = torch.randn(1, 3, 64, 64)
    got, ref = _run_pte(m["pte"], x), _eager(cfg, x)
    assert got[0].shape == ref[0].shape == (1, 48) and got[1].shape == ref[1].shape == (1, 4, 48)
    assert min(_cos(g, r) for g, r in zip(got, ref)) >= 0.999
    assert json.loads((out / "result.json").read_text())["status"] == "failed"


def test_full_delegation_gate_lists_the_ops_left_out(tmp_path: Path, tiny_data: Path, vit_weights: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    from eupe.export import lower, rewrite

    # without its rewrites (the module swap and the graph decomposition), LayerNorm is left to the portable
    # kernels: the gate names it
    monkeypatch.setattr(lower, "gemm_layer_norms", lambda module: module)
    monkeypatch.delitem(rewrite.DECOMPOSITIONS, torch.ops.aten.layer_norm.default)
    cfg = _config(tiny_data, vit_weights, *VIT, "export.resolutions=[64]", "export.int8=false",
                  "export.require_full_delegation=true")
    out = tmp_path / "export"
    left_out = r"student_64px_fp32: not delegated to XNNPACK: .*aten_native_layer_norm_default x\d"
    with pytest.raises(EupeError, match=left_out):
        run_export(cfg, out)
    m = json.loads((out / "export.json").read_text())["models"]["student_64px_fp32"]
    assert not m["passed"] and m["parity_cosine"] >= 0.999 and m["non_delegated_ops"]["aten_native_layer_norm_default"] > 0


def test_one_program_holds_a_method_per_resolution_with_the_weights_once(tmp_path: Path, tiny_data: Path,
                                                                         vit_weights: Path):
    cfg = _config(tiny_data, vit_weights, *VIT, "export.resolutions=[32, 48]", "export.int8_min_cosine=0.9",
                  "export.require_full_delegation=true")
    out = tmp_path / "export"
    result = run_export(cfg, out)
    models = json.loads((out / "export.json").read_text())["models"]
    assert sorted(models) == ["student_32px_fp32", "student_32px_int8", "student_48px_fp32", "student_48px_int8",
                              "student_multires_fp32", "student_multires_int8"]
    for dtype in ("fp32", "int8"):
        multi = models[f"student_multires_{dtype}"]
        singles = [models[f"student_{r}px_{dtype}"]["bytes"] for r in (32, 48)]
        assert multi["bytes"] == Path(multi["pte"]).stat().st_size and multi["single_resolution_bytes"] == sum(singles)
        # the weights are stored once: the second method adds its graph and position embedding, far less than
        # a second file (a tiny model's graphs weigh as much as its weights; a ViT-S's file is ~1/n of the sum)
        assert multi["bytes"] - max(singles) < 0.5 * min(singles)
        assert multi["bytes_vs_single_files"] == pytest.approx(multi["bytes"] / sum(singles), abs=1e-4)
        assert multi["resolutions"] == [32, 48] and multi["passed"] and multi["non_delegated_ops"] == {}
        assert sorted(multi["methods"]) == ["forward_32", "forward_48"]
        assert multi["parity_cosine"] == min(m["parity_cosine"] for m in multi["methods"].values())
        assert result["artifacts"][f"student_multires_{dtype}"] == multi["pte"]

    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(models["student_multires_fp32"]["pte"]))
    assert set(program.method_names) == {"forward_32", "forward_48"}
    for r, tokens in ((32, 4), (48, 9)):
        x = torch.randn(1, 3, r, r)
        got, ref = list(program.load_method(f"forward_{r}").execute([x])), _eager(cfg, x)
        assert [g.shape for g in got] == [r_.shape for r_ in ref] == [torch.Size([1, 32]), torch.Size([1, tokens, 32])]
        assert min(_cos(g, r_) for g, r_ in zip(got, ref)) >= 0.999


def test_only_multires_writes_the_multi_resolution_programs_and_sizes_the_files_they_stand_for(
        tmp_path: Path, tiny_data: Path, vit_weights: Path):
    """What a pipeline fanned out per (resolution, dtype) adds as one more element: no one-size file (its
    sibling elements write those), but their bytes counted against the multi-resolution file."""
    cfg = _config(tiny_data, vit_weights, *VIT, "export.resolutions=[32, 48]", "export.int8=false")
    out = tmp_path / "multi"
    result = run_export(cfg, out, only="multires")
    models = json.loads((out / "export.json").read_text())["models"]
    assert sorted(models) == ["student_multires_fp32"] and sorted(p.name for p in out.glob("*.pte")) == [
        "student_multires_fp32.pte"]
    multi = models["student_multires_fp32"]
    assert multi["passed"] and sorted(multi["methods"]) == ["forward_32", "forward_48"]
    assert multi["bytes"] < multi["single_resolution_bytes"]  # each one-size file holds the weights once more
    assert result["artifacts"]["student_multires_fp32"] == multi["pte"]
    with pytest.raises(EupeError, match="--only multires: export.resolutions \\[32\\] holds one size"):
        run_export(_config(tiny_data, vit_weights, *VIT, "export.resolutions=[32]"), tmp_path / "one", only="multires")


def _train_student(path: Path, model_overrides: list[str], data: Path, steps: int = 80) -> Path:
    """A tiny student trained as the pipeline trains one (its patch and class tokens pulled towards a
    teacher's, AdamW), saved as the trainer saves it: weights far from their initialisation (ConvNeXt's
    layer scales grow from 1e-6 to carry each block), with the activation outliers int8 must survive."""
    cfg = load_config(None, model_overrides)
    spec = cfg.student
    torch.manual_seed(0)
    student, teacher = build_model(spec).train(), build_model(spec).eval()
    source = open_source(str(data))
    images = torch.stack([DistillImages(source, spec.img_size, train=False)[i][0] for i in range(len(source))])
    x_all = prepare(images, spec.img_size, *model_inputs(student, torch.device("cpu")))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.05)
    with torch.no_grad():
        target = extract_features(teacher, x_all)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x_all), (8,), generator=g)
        f = extract_features(student, x_all[idx])
        loss = (1 - F.cosine_similarity(f.patches, target.patches[idx], dim=-1)).mean() + F.smooth_l1_loss(f.cls, target.cls[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({f"encoder.{k}": v.detach().contiguous() for k, v in student.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("family", [VIT, CONVNEXT], ids=["vit", "convnext"])
def test_int8_of_a_trained_student_keeps_cosine_099_with_every_operator_delegated(tmp_path: Path, tiny_data: Path,
                                                                                  family: list[str]):
    weights = _train_student(tmp_path / "encoder.safetensors", family, tiny_data)
    cfg = _config(tiny_data, weights, *family, "export.resolutions=[64]", "export.int8_min_cosine=0.99",
                  "export.require_full_delegation=true", "export.parity_images=8")
    out = tmp_path / "export"
    run_export(cfg, out, dtypes=["int8"])  # fails on a cosine under 0.99 or an operator outside XNNPACK
    m = json.loads((out / "export.json").read_text())["models"]["student_64px_int8"]
    assert m["passed"] and m["parity_cosine"] >= 0.99 and m["non_delegated_ops"] == {} and m["xnnpack_subgraphs"] == 1
    fp32_bytes = 4 * sum(p.numel() for p in build_model(cfg.student).parameters())
    assert m["bytes"] < 0.8 * fp32_bytes  # int8 weights (a tiny ConvNeXt keeps its depthwise convs fp32)


@pytest.mark.parametrize("override, expected", [
    (["export.resolutions=[60]"], "export.resolutions: 60 px is not a multiple of vit_t's patch size 16"),
    (["data.root=/nonexistent/images"], "dataset folder not found: /nonexistent/images"),
    (["student.weights=/nonexistent/encoder.safetensors"], "student.weights: checkpoint not found"),
    (["student.weights=null"], "student.weights: no trained weights to export"),
    (["student.kwargs={embed_dim: 48, depth: 1, num_heads: 2}"], "does not fit VisionTransformer"),
], ids=["patch-multiple", "no-data", "no-checkpoint", "no-weights", "weights-of-another-model"])
def test_bad_input_fails_before_compute_and_keeps_old_output(tmp_path: Path, tiny_data: Path, vit_weights: Path,
                                                             override: list[str], expected: str):
    out = tmp_path / "export"
    out.mkdir()
    (out / "export.json").write_text("{}")
    earlier = '{"step": "export", "status": "ok"}'  # an earlier export's result: its own folder, complete
    (out / "result.json").write_text(earlier)
    with pytest.raises(EupeError, match=expected.replace(".", r"\.")):
        run_export(_config(tiny_data, vit_weights, *VIT, *override), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (out / "export.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "result.json"]  # no claim left, nothing dropped
    assert (out / "result.json").read_text() == earlier


@pytest.mark.parametrize("encoder", ["student", "proxy"])
def test_cli_routes_weights_to_the_chosen_encoder(tmp_path: Path, tiny_data: Path, encoder: str,
                                                  capsys: pytest.CaptureFixture[str]):
    from eupe.cli import main

    missing = tmp_path / "missing.safetensors"
    code = main(["export", "--encoder", encoder, "--weights", str(missing), "--data", str(tiny_data),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"eupe: error: {encoder}.weights: checkpoint not found: {missing}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["0", "-64"])
def test_cli_refuses_a_size_that_is_not_positive(tmp_path: Path, tiny_data: Path, vit_weights: Path, size: str,
                                                 capsys: pytest.CaptureFixture[str]):
    """--resolution 0 is the user's size, checked like the config's, not a missing flag (the default size)."""
    from eupe.cli import main

    code = main(["export", "--weights", str(vit_weights), "--data", str(tiny_data), "--resolution", size,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "export.resolutions" in err and f"got [{size}]" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_shards_are_refused_before_compute(tmp_path: Path, vit_weights: Path):
    shard = tmp_path / "train-0000.tar"
    tarfile.open(shard, "w").close()
    with pytest.raises(EupeError, match=re.escape(f"data {shard}: export (int8 calibration and the parity check) "
                                                  "needs an image folder")):
        run_export(_config(shard, vit_weights, *VIT), tmp_path / "out")
    assert not (tmp_path / "out").exists()
