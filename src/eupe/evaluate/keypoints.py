"""PCK@alpha for keypoint correspondence between an image and a known warp of it.

Keypoints are the centres of the source image's feature cells (on labelled objects when masks exist)
that land inside the warped frame. Each is matched to the warped image's cell whose feature is the
most cosine-similar; the match is correct when that cell's centre lies within
``alpha * max(height, width)`` of the keypoint's true warped position.
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


def match(src: torch.Tensor, src_grid: tuple[int, int], dst: torch.Tensor, dst_grid: tuple[int, int],
          homographies: torch.Tensor, size: tuple[int, int], alpha: float = 0.1,
          src_valid: torch.Tensor | None = None) -> Matches:
    """Nearest-neighbour matching of [B, N, D] source tokens into [B, M, D] warped tokens.

    ``homographies`` [B, 3, 3] map source pixels to warped pixels; ``src_valid`` [B, N] optionally
    restricts the keypoints (e.g. to object pixels)."""
    b = src.shape[0]
    kp = cell_centres(src_grid, size)
    truth = transform_points(homographies.double().cpu(), kp.expand(b, -1, -1))
    inside = (truth[..., 0] >= 0) & (truth[..., 0] < size[1]) & (truth[..., 1] >= 0) & (truth[..., 1] < size[0])
    valid = inside if src_valid is None else inside & src_valid.cpu()
    sim = F.normalize(src.float(), dim=-1) @ F.normalize(dst.float(), dim=-1).transpose(1, 2)  # [B, N, M]
    predicted = cell_centres(dst_grid, size)[sim.argmax(-1).cpu()]
    err = (predicted - truth).norm(dim=-1)
    correct = valid & (err <= alpha * max(size))
    return Matches(kp, truth, predicted, valid, correct)


def sample_mask(masks: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Value of [B, L, L] masks at [K, 2] image-pixel points -> [B, K]."""
    lh, lw = masks.shape[-2:]
    col = (points[:, 0] * lw / size[1]).long().clamp(0, lw - 1)
    row = (points[:, 1] * lh / size[0]).long().clamp(0, lh - 1)
    return masks[:, row, col]
