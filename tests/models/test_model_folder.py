"""The trained encoder loads with one timm call, no project code (issue: what users touch, item 1)."""

import json
import subprocess
import sys

import torch

from eupe import storage
from eupe.cli import main
from eupe.config import load_config
from eupe.models.features import extract_features
from eupe.models.registry import build_model

TIMM_ONLY = """
import sys, timm, torch
folder = sys.argv[1]
m = timm.create_model("local-dir:" + folder, pretrained=True).eval()
x = torch.load(sys.argv[2])
torch.save(m.forward_features(x), sys.argv[3])
assert "eupe" not in sys.modules, "the project was imported"
print(m.pretrained_cfg["input_size"], m.pretrained_cfg["mean"])
"""


def test_a_training_stage_publishes_a_timm_model_folder(tiny_config, tmp_path):
    assert main(["normalize", "--config", str(tiny_config), "--stage", "1", "--out", str(tmp_path / "n")]) == 0
    out = tmp_path / "s1"
    assert main(["train", "--config", str(tiny_config), "--stage", "1", "--set", "stage1.iters=2",
                 "--set", "stage1.warmup_iters=1", "--norm", str(tmp_path / "n" / "norm.safetensors"),
                 "--out", str(out)]) == 0
    folder = out / "model"
    result = storage.read_result(out)  # artifact paths resolved (written relative to result.json)
    assert result["artifacts"]["model"] == str(folder)
    config = json.loads((folder / "config.json").read_text())
    cfg = load_config(tiny_config)
    assert config["architecture"] == cfg.proxy.model and config["model_args"]["embed_dim"] == 64
    assert config["pretrained_cfg"]["input_size"] == [3, 56, 56] and config["pretrained_cfg"]["mean"] == [0.5] * 3
    assert config["eupe"]["stage"] == 1 and config["eupe"]["summary"] == "pool" and config["eupe"]["norm"].startswith("sha256:")

    x = torch.rand(2, 3, 56, 56)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = build_model(cfg.proxy.model_copy(update={"weights": str(folder)}), "proxy").eval()  # the folder as weights
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), ours.forward_features(x), atol=1e-6)
        same = build_model(cfg.proxy.model_copy(update={"weights": str(out / "encoder.safetensors")}), "proxy").eval()
        assert torch.equal(extract_features(ours, x).cls, extract_features(same, x).cls)


def test_model_names_take_timms_hub_and_folder_prefixes(tmp_path):
    import pytest

    from eupe.errors import EupeError
    from eupe.models.registry import check_model_name

    assert check_model_name("hf-hub:timm/vit_small_patch16_224.augreg_in21k") == "hf-hub:timm/vit_small_patch16_224.augreg_in21k"
    with pytest.raises(EupeError, match="no timm model folder with config.json there"):
        check_model_name(f"local-dir:{tmp_path}", "student.model")
