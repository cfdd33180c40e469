"""Only architecture arguments reach timm.create_model, each checked; what timm still refuses is one line
(issue: reliability, item 5)."""

import pytest

from eupe.cli import main


@pytest.mark.parametrize("kwargs,said", [
    ("{checkpoint_path: /etc/passwd}", "'checkpoint_path' is not a timm architecture argument"),
    ("{pretrained_cfg_overlay: {url: 'http://evil/x.bin'}}", "'pretrained_cfg_overlay' is not a timm architecture"),
    ("{pretrained_cfg: {file: /tmp/x}}", "'pretrained_cfg' is not a timm architecture argument"),
    ("{embed_dim: -5}", "embed_dim must be a positive integer, got -5"),
    ("{depth: 2.5}", "depth must be a positive integer, got 2.5"),
    ("{drop_path_rate: 1.5}", "drop_path_rate must be a number in [0, 1), got 1.5"),
    ("{depths: [1, 0, 1, 1]}", "depths must be a non-empty list of positive integers"),
])
def test_injected_or_impossible_kwargs_are_refused_at_load(tiny_config, kwargs, said, capsys, tmp_path):
    code = main(["normalize", "--config", str(tiny_config), "--stage", "1", "--set", f"student.kwargs={kwargs}",
                 "--out", str(tmp_path / "n")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "config field 'student.kwargs'" in err and said in err, err
    assert not (tmp_path / "n").exists()


def test_what_timm_refuses_is_one_line_naming_the_field(tiny_config, capsys, tmp_path):
    """Each value valid alone, impossible together: 30 channels do not split into 4 heads."""
    code = main(["normalize", "--config", str(tiny_config), "--stage", "1", "--set",
                 "teachers.0.kwargs={embed_dim: 30, depth: 1, num_heads: 4}", "--out", str(tmp_path / "n")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "teachers.0.kwargs" in err and "timm cannot build" in err, err
