"""Each evaluation metric on inputs whose answer is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eupe.distill.normalize import FeatureStats
from eupe.distill.targets import Target
from eupe.evaluate import knn, probes
from eupe.evaluate.data import split
from eupe.evaluate.fidelity import fidelity_batch
from eupe.evaluate.keypoints import cell_centres, match, upsample_matrix
from eupe.evaluate.warp import homography_from_points, random_homographies, transform_points, warp_images
from eupe.models.features import Features, extract_features

SIZE = 64


# --------------------------------------------------------------------------- warps


def test_homography_maps_the_given_points_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    src = torch.rand(5, 4, 2, generator=g, dtype=torch.float64) * 10 + torch.tensor([[0, 0], [50, 0], [50, 50], [0, 50]])
    dst = src + torch.randn(5, 4, 2, generator=g, dtype=torch.float64) * 3
    h = homography_from_points(src, dst)
    torch.testing.assert_close(transform_points(h, src), dst)


def test_warped_image_puts_a_dot_where_the_homography_says() -> None:
    h = random_homographies(6, SIZE, 0.15, torch.Generator().manual_seed(1))
    dots = torch.tensor([[20.5, 30.5], [40.5, 24.5], [32.5, 32.5], [28.5, 40.5], [36.5, 20.5], [24.5, 36.5]])
    images = torch.zeros(6, 1, SIZE, SIZE, dtype=torch.uint8)
    for i, (x, y) in enumerate(dots.long().tolist()):
        images[i, 0, y - 1 : y + 2, x - 1 : x + 2] = 255  # a 3x3 dot centred on the pixel centre (x+.5, y+.5)
    warped = warp_images(images, h).float()[:, 0]
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    mass = warped.sum((1, 2))
    centroid = torch.stack([(warped * xs).sum((1, 2)) / mass, (warped * ys).sum((1, 2)) / mass], -1)
    expected = transform_points(h, dots[:, None].double())[:, 0].float()
    assert (centroid - expected).norm(dim=-1).max() < 0.75


# --------------------------------------------------------------------------- keypoints


def _position_features(points: torch.Tensor, freqs: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Random Fourier features of positions: cosine similarity falls off with distance (a Gaussian kernel)."""
    return torch.cos(points.float() @ freqs + phase)


def _warp_setup(batch: int = 4, grid: int = 16):
    g = torch.Generator().manual_seed(2)
    h = random_homographies(batch, SIZE, 0.15, g)
    freqs = torch.randn(2, 512, generator=g) / 4.0  # kernel width ~ 4 px (one cell)
    phase = torch.rand(512, generator=g) * 2 * math.pi
    centres = cell_centres((grid, grid), (SIZE, SIZE))
    src = _position_features(centres, freqs, phase).expand(batch, -1, -1)
    # The warped image's cell at p shows the source point H^-1 p: its feature is that point's feature.
    seen = transform_points(torch.linalg.inv(h), centres.expand(batch, -1, -1))
    dst = _position_features(seen, freqs, phase)
    return h, src, dst, (grid, grid)


def test_features_that_follow_the_warp_give_pck_1() -> None:
    h, src, dst, grid = _warp_setup()
    m = match(src, grid, dst, grid, h, (SIZE, SIZE), alpha=0.1)
    assert m.valid.sum() > 500  # most of the 4 x 256 keypoints stay inside the warped frame
    assert m.correct.sum() == m.valid.sum()  # PCK@0.1 == 1.0
    # and the predicted positions are within one cell of the truth
    assert ((m.predicted - m.truth).norm(dim=-1)[m.valid]).max() <= 4 * math.sqrt(2)


def test_features_unrelated_to_the_warp_give_low_pck() -> None:
    h, src, dst, grid = _warp_setup()
    perm = torch.randperm(dst.shape[1], generator=torch.Generator().manual_seed(3))
    m = match(src, grid, dst[:, perm], grid, h, (SIZE, SIZE), alpha=0.1)
    assert m.correct.sum() / m.valid.sum() < 0.2


def test_keypoints_can_be_restricted_and_identity_matches_itself() -> None:
    _, src, _, grid = _warp_setup(batch=2)
    identity = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    only = torch.zeros(2, 256, dtype=torch.bool)
    only[:, :10] = True
    m = match(src, grid, src, grid, identity, (SIZE, SIZE), src_valid=only)
    assert int(m.valid.sum()) == 20 and int(m.correct.sum()) == 20
    # predictions are pixel centres; a 4-px cell's centre is a pixel corner: half a pixel off in x and y at most
    assert (m.predicted - m.truth)[m.valid].abs().max() <= 0.5


def _linear_position_features(points: torch.Tensor) -> torch.Tensor:
    """[.., 2] pixel positions -> [.., 3] features linear in x and y (the constant keeps cosine similarity
    largest at the same position)."""
    xy = (points.float() - SIZE / 2) / (SIZE / 2)
    return torch.cat([xy, torch.ones_like(xy[..., :1])], -1)


def test_pck_is_1_at_a_4x4_patch_grid() -> None:
    # 64 px with patch 16: cell centres are 16 px apart, more than twice the 6.4 px PCK@0.1 threshold.
    batch, grid = 8, (4, 4)
    h = random_homographies(batch, SIZE, 0.15, torch.Generator().manual_seed(4))
    centres = cell_centres(grid, (SIZE, SIZE))
    src = _linear_position_features(centres).expand(batch, -1, -1)
    dst = _linear_position_features(transform_points(torch.linalg.inv(h), centres.expand(batch, -1, -1)))
    m = match(src, grid, dst, grid, h, (SIZE, SIZE), alpha=0.1)
    assert m.valid.sum() >= 0.9 * batch * 16
    assert m.correct.sum() == m.valid.sum()  # PCK@0.1 == 1.0
    assert ((m.predicted - m.truth).norm(dim=-1)[m.valid]).max() < 2.0  # sub-cell: a few pixels at most
    coarse = match(src, grid, dst, grid, h, (SIZE, SIZE), alpha=0.1, fine=grid)  # argmax on the patch grid itself
    assert coarse.correct.sum() < 0.8 * coarse.valid.sum()


def test_upsampling_reproduces_linear_features_up_to_the_border() -> None:
    x = torch.linspace(-1, 2, 4)[None] + 3 * torch.linspace(0, 1, 5)[:, None]  # [5, 4], linear in row and column
    up = upsample_matrix(5, 20) @ x @ upsample_matrix(4, 16).T
    centre_y, centre_x = (torch.arange(20) + 0.5) * 5 / 20 - 0.5, (torch.arange(16) + 0.5) * 4 / 16 - 0.5
    expected = (-1 + centre_x * 1.0)[None] + 3 * (centre_y / 4)[:, None]
    torch.testing.assert_close(up, expected)
    torch.testing.assert_close(upsample_matrix(1, 3), torch.ones(3, 1))


# --------------------------------------------------------------------------- k-NN


def _clusters(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 5
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, dim, generator=g) * spread, labels


def test_knn_on_separated_clusters_is_perfect() -> None:
    train, train_y = _clusters(400, 5, 16, 0.3, seed=0)
    query, query_y = _clusters(200, 5, 16, 0.3, seed=1)
    assert knn.knn_top1(train, train_y, query, query_y, k=20, temperature=0.07) == 1.0


def test_knn_on_shuffled_labels_is_about_chance() -> None:
    train, train_y = _clusters(2000, 4, 16, 0.3, seed=0)
    query, query_y = _clusters(1000, 4, 16, 0.3, seed=1)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(5))]
    acc = knn.knn_top1(train, shuffled, query, query_y, k=20, temperature=0.07)
    assert 0.18 < acc < 0.32  # chance is 0.25; the std of 1000 draws is ~0.014


def test_knn_votes_are_weighted_by_similarity() -> None:
    # One very close neighbour of class 0 against two distant ones of class 1.
    bank = F.normalize(torch.tensor([[1.0, 0.05], [0.6, 0.8], [0.6, -0.8]]), dim=-1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn.knn_predict(bank, labels, query, k=3, temperature=0.07).item() == 0  # exp(sim/T) favours the close one
    assert knn.knn_predict(bank, labels, query, k=3, temperature=100.0).item() == 1  # ~ a plain majority vote


def test_split_is_deterministic_disjoint_and_capped() -> None:
    a, b = split(100, 40, 0.25, seed=3), split(100, 40, 0.25, seed=3)
    assert a == b and len(a.heldout) == 10 and len(a.train) == 30
    assert not set(a.train) & set(a.heldout)
    assert split(100, 40, 0.25, seed=4) != a


# --------------------------------------------------------------------------- probes


def _block_masks(n: int, classes: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (n, 1, size // 4, size // 4), generator=g).float()
    return F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()


def test_probe_on_one_hot_mask_features_reaches_miou_1() -> None:
    masks = _block_masks(24, 4, 16, seed=0)
    tokens = F.one_hot(masks.flatten(1), 4).float()  # [N, 256, 4]: the mask itself, per token
    tokens = torch.cat([tokens, torch.randn(*tokens.shape[:2], 3)], -1)  # plus distracting channels
    train, held = slice(0, 16), slice(16, 24)
    probe, losses = probes.train_seg_probe(tokens[train], (16, 16), masks[train], 4, ignore_index=255, epochs=30,
                                           lr=0.05, weight_decay=0.0, batch_size=8, seed=0, device=torch.device("cpu"))
    assert losses[-1] < losses[0]
    pred = probes.predict(probe, tokens[held], (16, 16), 16, 8, torch.device("cpu"), classes=True)
    score, per_class = probes.miou(pred, masks[held], 4, ignore_index=255)
    assert score > 0.99 and all(v is not None and v > 0.99 for v in per_class)


def test_miou_known_values_and_ignored_pixels() -> None:
    truth = torch.tensor([0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    score, per_class = probes.miou(pred, truth, 3, ignore_index=255)
    assert per_class == [pytest.approx(0.5), pytest.approx(2 / 3), None]  # class 2 only predicted on ignored pixels
    assert score == pytest.approx((0.5 + 2 / 3) / 2)
    # An ignore index inside the class range is never scored as a class.
    score0, per0 = probes.miou(torch.tensor([1, 1, 2, 0]), torch.tensor([1, 1, 2, 0]), 3, ignore_index=0)
    assert score0 == 1.0 and per0[0] is None


def test_depth_probe_on_linear_features_has_zero_error() -> None:
    g = torch.Generator().manual_seed(0)
    depth = 2 + 6 * torch.rand(20, 8, 8, generator=g)
    depth[:, 0, :3] = 0  # missing measurements are neither fitted nor scored
    noise = torch.randn(20, 64, 5, generator=g)
    tokens = torch.cat([(0.3 * depth.flatten(1) - 1)[..., None], noise], -1)  # depth, linearly, in channel 0
    probe = probes.fit_depth_probe(tokens[:14], (8, 8), depth[:14], ridge=1e-9)
    pred = probes.predict(probe, tokens[14:], (8, 8), 8, 4, torch.device("cpu"))[:, 0]
    scores = probes.depth_metrics(pred, depth[14:])
    assert scores.rmse < 1e-3 and scores.delta1 == 1.0


def test_depth_metrics_known_values() -> None:
    truth = torch.tensor([1.0, 2.0, 4.0, 0.0])
    pred = torch.tensor([1.0, 3.0, 4.0, 100.0])  # the last pixel has no measurement
    scores = probes.depth_metrics(pred, truth)
    assert scores.rmse == pytest.approx(math.sqrt(1 / 3))
    assert scores.delta1 == pytest.approx(2 / 3)  # 3/2 = 1.5 is outside 1.25


def test_feature_stats_are_the_per_channel_population_mean_and_std() -> None:
    tokens = torch.randn(10, 7, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 5.0]) + 4
    mean, std = probes.feature_stats(tokens.half(), chunk=3)
    flat = tokens.half().double().reshape(-1, 3)
    torch.testing.assert_close(mean, flat.mean(0).float())
    torch.testing.assert_close(std, (flat.std(0, unbiased=False) + 1e-6).float())


def test_probe_upsampling_is_exactly_bilinear() -> None:
    x = torch.randn(2, 3, 4, 6)
    rows, cols = probes.linear_resize_matrix(4, 32), probes.linear_resize_matrix(6, 32)
    torch.testing.assert_close(rows @ x @ cols.T, F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))


# --------------------------------------------------------------------------- fidelity


class _PatchCNN(nn.Module):
    """A target with the timm CNN interface: [B, 8, 4, 4] feature map, mean-pooled class vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.feature_info = [{"num_chs": 8, "reduction": 8, "module": "conv"}]  # timm's: the token stride

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return x.mean((2, 3))


class _Adapter(nn.Module):
    """Student features -> ``sign * 3 *`` the target's normalized features (here the student IS the target)."""

    def __init__(self, stats: FeatureStats, sign: float) -> None:
        super().__init__()
        self.stats, self.sign = stats, sign

    def forward(self, feats: Features, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        cls, patches = self.stats.apply(feats.cls, feats.patches)
        return self.sign * 3 * cls, self.sign * 3 * patches


def test_fidelity_is_1_when_the_adapted_student_equals_the_normalized_target() -> None:
    torch.manual_seed(0)
    model = _PatchCNN().eval()
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    targets = [Target(name, model, [32], 1.0, zero, one) for name in ("same", "opposite")]
    g = torch.Generator().manual_seed(1)
    stats = FeatureStats(torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5,
                         torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        student = extract_features(model, images.float() / 255)
    adapters = {"same": _Adapter(stats, 1.0), "opposite": _Adapter(stats, -1.0)}
    sums = fidelity_batch(student, images, targets, adapters, {"same": stats, "opposite": stats}, size=32)
    torch.testing.assert_close(sums["same"], torch.tensor([5.0, 5.0]))  # cosine 1 for each of the 5 images
    torch.testing.assert_close(sums["opposite"], torch.tensor([-5.0, -5.0]))
