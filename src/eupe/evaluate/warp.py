"""Known warps for keypoint correspondence: a random homography per image, applied on the fly.

Coordinates are continuous pixels (x right, y down; pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``,
its centre is ``(j + 0.5, i + 0.5)``). ``H`` maps a point of the source image to where it appears in
the warped image, so every keypoint's true position after the warp is known exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def homography_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[B, 4, 2] point pairs -> [B, 3, 3] homographies with ``H @ src ~ dst`` (DLT, h33 = 1)."""
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)  # [B, 8, 8]
    b = torch.cat([u, v], 1)  # [B, 8]
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


def random_homographies(n: int, size: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """[n, 3, 3]: the image corners each moved by up to ``strength * size`` pixels in x and y."""
    corners = torch.tensor([[0.0, 0.0], [size, 0.0], [size, size], [0.0, size]], dtype=torch.float64)
    jitter = (torch.rand(n, 4, 2, generator=generator, dtype=torch.float64) * 2 - 1) * strength * size
    return homography_from_points(corners.expand(n, 4, 2), corners + jitter)


def transform_points(h: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply [B, 3, 3] homographies to [B, K, 2] points."""
    homo = torch.cat([points.to(h.dtype), torch.ones_like(points[..., :1], dtype=h.dtype)], -1)
    out = homo @ h.transpose(1, 2)
    return out[..., :2] / out[..., 2:]


def warp_images(images: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, S, S] -> the same images seen through ``h`` (bilinear, black outside the source)."""
    b, _, height, width = images.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    out_pts = torch.stack([xs, ys], -1).view(1, -1, 2).expand(b, -1, -1)
    src = transform_points(torch.linalg.inv(h), out_pts)  # where each output pixel comes from
    grid = torch.stack([src[..., 0] * 2 / width - 1, src[..., 1] * 2 / height - 1], -1).view(b, height, width, 2)
    warped = F.grid_sample(images.float(), grid.to(images.device, torch.float32), mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    return warped.round().clamp(0, 255).to(torch.uint8)
