"""The original's test protocol (SPEC 8.2), streamed.

Per class: each group's raw map is min-max normalised with the class-wide minimum and maximum
(transductive), weighted by the image's largest routing weight in that group, summed, resized
to 256 px (bilinear) and smoothed with a 5x5, sigma-4 Gaussian (zero padding). The image
score is the mean of the top 1 % pixels.

Resizing and smoothing are linear, so with L = blur o resize and a group map M,
    L(w (M - min) / range) = w / range * (L(M) - min * L(1)).
Each image therefore only needs L(M) at 256 px and its own min/max at full resolution while
the class streams by; the class statistics are applied at the end. This equals the original
order of operations up to float rounding.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

RANGE_EPS = 1e-11  # added to max - min, as the original


@lru_cache(maxsize=8)
def gaussian_kernel(size: int = 5, sigma: float = 4.0) -> Tensor:
    """(1, 1, size, size) normalised Gaussian."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).float()[None, None]


def resize_and_smooth(maps: Tensor, size: int = 256, kernel: int = 5, sigma: float = 4.0) -> Tensor:
    """(B, 1, H, W) -> (B, 1, size, size): bilinear resize, then Gaussian blur with zero padding."""
    maps = F.interpolate(maps, size=(size, size), mode="bilinear")
    weight = gaussian_kernel(kernel, sigma).to(maps)
    return F.conv2d(maps, weight, padding=kernel // 2)


def top_percent_score(maps: Tensor, fraction: float = 0.01) -> Tensor:
    """Mean of the top ``fraction`` of pixels of each (B, 1, H, W) map -> (B,)."""
    flat = maps.flatten(1)
    k = max(1, int(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def combine_groups(
    smoothed: Tensor, minimum: Tensor, maximum: Tensor, group_weights: Tensor, ones_smoothed: Tensor
) -> Tensor:
    """Final maps of one class from per-group smoothed raw maps.

    Args:
        smoothed: (N, G, S, S) L(M_g) per image and group.
        minimum, maximum: (G,) or (N, G) extremes of each raw group map (full resolution) used to
            normalise it: the class's test set (paper protocol) or normal images (inductive).
        group_weights: (N, G) largest routing weight of each group per image.
        ones_smoothed: (1, 1, S, S) L applied to a map of ones (the border effect of padding).
    Returns:
        (N, 1, S, S) final anomaly maps.
    """
    scale = group_weights / (maximum - minimum + RANGE_EPS)  # (N, G)
    shifted = smoothed - minimum[..., None, None] * ones_smoothed  # (N, G, S, S)
    return (scale[:, :, None, None] * shifted).sum(dim=1, keepdim=True)


def resize_ground_truth(gt: Tensor, size: int = 256) -> Tensor:
    """(B, 1, H, W) masks -> (B, 1, size, size) bool by nearest resizing, then > 0 (SPEC 8.2)."""
    return F.interpolate(gt.float(), size=(size, size), mode="nearest") > 0
