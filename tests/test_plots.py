"""Plots a reader understands: no empty panels, a per-resolution panel for stage 3, legends and colour bars."""

import random

import torch
from PIL import Image

from eupe.data.audit_plots import balance_bars
from eupe.evaluate import report
from eupe.plots import loss_curve, plt


def _width(path) -> int:
    return Image.open(path).size[0]


def test_a_grouping_without_labels_gets_no_empty_panel(tmp_path):
    both = _width(balance_bars({"class": {"a": 3, "b": 4}, "domain": {"x": 2, "y": 5}}, tmp_path / "both.png"))
    one = _width(balance_bars({"class": {"a": 3, "b": 4}, "domain": {}}, tmp_path / "one.png"))
    assert one * 2 == both


def test_stage3_loss_curve_has_a_panel_per_drawn_resolution_and_the_total_on_top(tmp_path, monkeypatch):
    rng = random.Random(0)
    h = {"loss": [1.0 / (i + 1) for i in range(30)], "per_target": {"proxy": [0.9 / (i + 1) for i in range(30)]},
         "resolutions": [{"student": rng.choice([64, 96, 128])} for _ in range(30)]}
    figures = []
    monkeypatch.setattr("eupe.plots.save_figure", lambda fig, path: figures.append(fig) or path)
    loss_curve(h, tmp_path / "s3.png", "stage 3")
    loss_curve({**h, "resolutions": [{"student": 64}] * 30}, tmp_path / "s2.png", "stage 2")
    multi, single = figures
    assert len(multi.axes) == 2 and len(single.axes) == 1
    main = multi.axes[0]
    total = [ln for ln in main.get_lines() if ln.get_label().startswith("total")][0]
    assert total.get_zorder() > max(ln.get_zorder() for ln in main.get_lines() if ln is not total)
    assert {t.get_text().split(" (")[0] for t in multi.axes[1].get_legend().get_texts()} == \
        {"student 64 px", "student 96 px", "student 128 px"}
    plt.close("all")


def test_depth_panels_have_colour_bars_and_seg_a_class_legend(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or path)
    image = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    report.depth_example(image, torch.rand(16, 16) + 0.5, torch.rand(16, 16) + 0.5, tmp_path / "d.png")
    report.seg_example(image, torch.tensor([[0, 1], [2, 1]]).repeat(8, 8), torch.ones(16, 16, dtype=torch.long), 4,
                       tmp_path / "s.png")
    depth, seg = figures
    assert sum(ax.get_label() == "<colorbar>" for ax in depth.axes) == 2
    assert [t.get_text() for t in seg.legends[0].get_texts()] == ["class 0", "class 1", "class 2"]
    plt.close("all")
