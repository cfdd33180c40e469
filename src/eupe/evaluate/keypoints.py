"""PCK@alpha for keypoint correspondence between an image and a known warp of it.

Keypoints are the centres of the source image's feature cells (on labelled objects when masks exist)
that land inside the warped frame. The warped image's features are upsampled bilinearly to a fine grid
(pixels by default) and each keypoint is matched to the fine cell whose feature is the most
cosine-similar; the match is correct when that cell's centre lies within ``alpha * max(height, width)``
of the keypoint's true warped position. (Matching on the patch grid itself would put every prediction
on a patch centre: at 4x4 patches the quantization alone exceeds the 0.1 threshold for about 30% of the keypoints.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eupe.evaluate.warp import transform_points


@dataclass
class Matches:
    source: torch.Tensor  # [K, 2] keypoints in the source image (pixels, x y)
    truth: torch.Tensor  # [B, K, 2] their true positions in the warped image
    predicted: torch.Tensor  # [B, K, 2] centre of the best-matching warped cell
    valid: torch.Tensor  # [B, K] keypoint counted
    correct: torch.Tensor  # [B, K] valid and within the threshold


def cell_centres(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[h*w, 2] pixel centres (x, y) of a feature grid laid over an image of ``size`` (H, W), row-major."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * size[0] / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * size[1] / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)


def upsample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: 1-D linear interpolation between cell centres (the ``align_corners=False`` geometry),
    continued linearly over the outer half cells instead of clamped, so that a feature varying linearly
    with position is reproduced exactly up to the image border."""
    if n_in == 1:
        return torch.ones(n_out, 1)
    t = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5  # in input-cell units
    left = t.floor().clamp(0, n_in - 2).long()
    w = t - left
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m[rows, left], m[rows, left + 1] = 1 - w, w
    return m.float()


def match(src: torch.Tensor, src_grid: tuple[int, int], dst: torch.Tensor, dst_grid: tuple[int, int],
          homographies: torch.Tensor, size: tuple[int, int], alpha: float = 0.1,
          src_valid: torch.Tensor | None = None, fine: tuple[int, int] | None = None) -> Matches:
    """Nearest-neighbour matching of [B, N, D] source tokens into [B, M, D] warped tokens, the latter
    upsampled to the ``fine`` grid (default: one cell per pixel of ``size``) before the argmax.

    ``homographies`` [B, 3, 3] map source pixels to warped pixels; ``src_valid`` [B, N] optionally
    restricts the keypoints (e.g. to object pixels)."""
    b = src.shape[0]
    fine = tuple(fine or size)
    kp = cell_centres(src_grid, size)
    truth = transform_points(homographies.double().cpu(), kp.expand(b, -1, -1))
    inside = (truth[..., 0] >= 0) & (truth[..., 0] < size[1]) & (truth[..., 1] >= 0) & (truth[..., 1] < size[0])
    valid = inside if src_valid is None else inside & src_valid.cpu()
    rows = upsample_matrix(dst_grid[0], fine[0]).to(dst.device)
    cols = upsample_matrix(dst_grid[1], fine[1]).to(dst.device)
    best = []
    for s, d in zip(F.normalize(src.float(), dim=-1), dst.float()):  # one image at a time: [D, fine] is large
        up = rows @ d.T.reshape(-1, *dst_grid) @ cols.T  # [D, fine_h, fine_w]
        best.append((s @ F.normalize(up.flatten(1), dim=0)).argmax(-1).cpu())  # [N] fine-cell index
    predicted = cell_centres(fine, size)[torch.stack(best)]
    err = (predicted - truth).norm(dim=-1)
    correct = valid & (err <= alpha * max(size))
    return Matches(kp, truth, predicted, valid, correct)


def sample_mask(masks: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Value of [B, L, L] masks at [K, 2] image-pixel points -> [B, K]."""
    lh, lw = masks.shape[-2:]
    col = (points[:, 0] * lw / size[1]).long().clamp(0, lw - 1)
    row = (points[:, 1] * lh / size[0]).long().clamp(0, lh - 1)
    return masks[:, row, col]
