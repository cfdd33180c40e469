"""Known answers for the adapters: token resampling against F.interpolate on [B, D, h, w], and the
adapter MLPs written out with torch.nn.functional."""

import pytest
import torch

from eupe.models import TargetAdapter, resample_tokens
from eupe.models.features import Features
from reference import adapter_mlp, resample_grid


def _tokens(b: int, grid: tuple[int, int], d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, grid[0] * grid[1], d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid, size", [((3, 5), (6, 4)), ((4, 4), (7, 9)), ((6, 3), (2, 2))])
def test_resample_tokens_equals_bilinear_interpolation_of_the_channel_maps(grid, size):
    tokens = _tokens(2, grid, 5)
    got = resample_tokens(tokens, grid, size)
    assert got.shape == (2, size[0] * size[1], 5)
    torch.testing.assert_close(got, resample_grid(tokens, grid, size), rtol=1e-6, atol=1e-6)


def test_resample_tokens_keeps_each_channel_its_own():
    # channel c of every token is c * 10 + (row-major position): a resampled token mixes positions, never channels
    grid, d = (2, 3), 4
    tokens = (torch.arange(d).view(1, 1, d) * 10.0 + torch.arange(6.0).view(1, 6, 1)).clone()
    up = resample_tokens(tokens, grid, (4, 6))
    for c in range(d):
        assert torch.all((up[..., c] >= c * 10) & (up[..., c] <= c * 10 + 5)), c


def test_resample_tokens_known_values_of_a_2x_upsampling():
    # align_corners=False, 1 x 2 -> 1 x 4: output centres at 0.25, 0.75, 1.25, 1.75 input cells
    # -> weights give 0, 0.25, 0.75, 1 of the way from the first to the second token (edges clamp)
    tokens = torch.tensor([[[0.0], [4.0]]])
    got = resample_tokens(tokens, (1, 2), (1, 4)).flatten()
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 3.0, 4.0]))


def test_resample_tokens_is_the_identity_on_the_same_grid():
    tokens = _tokens(1, (3, 4), 2)
    assert torch.equal(resample_tokens(tokens, (3, 4), (3, 4)), tokens)


def test_adapter_is_the_papers_mlp_on_class_and_resampled_patch_tokens():
    torch.manual_seed(0)
    adapter = TargetAdapter((12, 10), (7, 9), hidden=16)
    for p in adapter.parameters():  # LayerNorm starts at weight 1, bias 0: give it values that show
        torch.nn.init.normal_(p, std=0.5)
    grid, target_grid = (3, 4), (5, 2)
    feats = Features(torch.randn(2, 12), _tokens(2, grid, 10, seed=3), grid)
    cls, patches = adapter(feats, target_grid)
    torch.testing.assert_close(cls, adapter_mlp(feats.cls, adapter.cls), rtol=1e-5, atol=1e-5)
    expected = adapter_mlp(resample_grid(feats.patches, grid, target_grid), adapter.patch)
    torch.testing.assert_close(patches, expected, rtol=1e-5, atol=1e-5)
