"""Refinement of part probability maps at image resolution.

The original refines with a fully connected CRF (pydensecrf: Gaussian + bilateral kernels,
2 mean-field iterations). pydensecrf is unmaintained and needs a compiler; here the same
mean-field updates run in torch with two normalised filters standing in for the kernels:

* the smoothness kernel: a Gaussian blur (torchvision);
* the appearance (bilateral) kernel: a colour guided filter (He, Sun and Tang, "Guided Image
  Filtering", TPAMI 2013), an edge-preserving filter whose cost does not grow with its radius.

With Potts compatibilities a mean-field step adds to each label's unary score the filtered
probability of that label around the pixel (SPEC 5.3's "compat" weights play the same role).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from torch import Tensor


def _window_sums(x: Tensor, radius: int, dim: int) -> Tensor:
    """Sums of x over [i - r, i + r] (clipped) along ``dim``, from one cumulative sum."""
    c = torch.cumsum(x, dim)
    n = x.shape[dim]
    head = torch.zeros_like(c.narrow(dim, 0, 1)).expand(*[radius + 1 if d == dim % x.ndim else -1 for d in range(x.ndim)])
    tail = c.narrow(dim, n - 1, 1).expand(*[radius if d == dim % x.ndim else -1 for d in range(x.ndim)])
    padded = torch.cat([head, c, tail], dim)  # padded[j] = c[j - r - 1], 0 before the start, c[n-1] after the end
    return padded.narrow(dim, 2 * radius + 1, n) - padded.narrow(dim, 0, n)


def box_filter(x: Tensor, radius: int, count: Tensor | None = None) -> Tensor:
    """Mean over the (2r+1)^2 window clipped to the image: (..., H, W). ``count``: the window
    sizes (``box_count``), when already at hand."""
    if count is None:
        count = box_count(x.shape[-2:], radius, x)
    return _window_sums(_window_sums(x, radius, -1), radius, -2) / count


def box_count(size: tuple[int, int], radius: int, like: Tensor) -> Tensor:
    """(H, W) number of pixels in each clipped window."""
    ones = torch.ones(tuple(size), dtype=like.dtype, device=like.device)
    return _window_sums(_window_sums(ones, radius, -1), radius, -2)


def inverse_3x3(m: Tensor) -> Tensor:
    """(..., 3, 3) inverses by cofactors (adjugate / determinant): plain arithmetic, so it exports
    to ONNX (which has no matrix inverse); for the well-conditioned guided-filter matrices it
    agrees with ``torch.linalg.inv`` to float rounding (``tests/test_export.py``)."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    cof = torch.stack([
        torch.stack([e * i - f * h, c * h - b * i, b * f - c * e], -1),
        torch.stack([f * g - d * i, a * i - c * g, c * d - a * f], -1),
        torch.stack([d * h - e * g, b * g - a * h, a * e - b * d], -1),
    ], -2)  # fmt: skip
    det = a * cof[..., 0, 0] + b * cof[..., 1, 0] + c * cof[..., 2, 0]
    return cof / det[..., None, None]


class GuidedFilter:
    """Colour guided filter with a fixed (..., 3, H, W) guide (one image or a batch); the
    per-pixel 3x3 inverses are computed once (by ``inverse``) and reused for every input
    filtered with the same guide."""

    def __init__(self, guide: Tensor, radius: int, eps: float, exported: bool = False) -> None:
        self.guide, self.radius, self.exported = guide, radius, exported
        inverse = inverse_3x3 if exported else torch.linalg.inv
        self.count = box_count(guide.shape[-2:], radius, guide)
        self.mean_i = self._box(guide)  # (..., 3, H, W)
        var_i = self._box(guide.unsqueeze(-3) * guide.unsqueeze(-4)) - self.mean_i.unsqueeze(-3) * self.mean_i.unsqueeze(-4)
        var_i = var_i + eps * torch.eye(3, dtype=guide.dtype, device=guide.device)[:, :, None, None]  # (..., 3, 3, H, W)
        self.inv_var = inverse(var_i.movedim((-4, -3), (-2, -1))).movedim((-2, -1), (-4, -3))  # (..., 3, 3, H, W)

    def _box(self, x: Tensor) -> Tensor:
        return box_filter(x, self.radius, self.count)

    def __call__(self, src: Tensor) -> Tensor:
        """(..., K, H, W) -> (..., K, H, W)."""
        guide = self.guide.unsqueeze(-3)  # (..., 3, 1, H, W)
        mean_i = self.mean_i.unsqueeze(-3)
        mean_p = self._box(src)  # (..., K, H, W)
        cov_ip = self._box(guide * src.unsqueeze(-4)) - mean_i * mean_p.unsqueeze(-4)  # (..., 3, K, H, W)
        if self.exported:  # onnxruntime runs einsum's per-pixel 3x3 products slowly: broadcast and sum
            a = (self.inv_var.unsqueeze(-3) * cov_ip.unsqueeze(-5)).sum(-4)  # (..., 3, K, H, W)
        else:
            a = torch.einsum("...ijhw,...jkhw->...ikhw", self.inv_var, cov_ip)  # (..., 3, K, H, W)
        b = mean_p - (a * mean_i).sum(-4)  # (..., K, H, W)
        return (self._box(a) * guide).sum(-4) + self._box(b)


@dataclass(frozen=True)
class RefineSettings:
    iterations: int = 3  # mean-field steps; 0 = no refinement (argmax of the upsampled scores)
    spatial_sigma: float = 0.006  # Gaussian kernel width, as a fraction of the image side
    spatial_weight: float = 1.0
    guided_radius: float = 0.02  # guided-filter window radius, as a fraction of the image side
    guided_eps: float = 1e-3  # guided-filter regulariser (guide in [0, 1]): larger = less edge-aware
    guided_weight: float = 3.0


def refine(logits: Tensor, image: Tensor, settings: RefineSettings, exported: bool = False) -> Tensor:
    """Mean-field refinement: (..., K, H, W) unary scores and the (..., 3, H, W) image in [0, 1]
    (one image or a batch) -> (..., K, H, W) label probabilities. ``exported``: the arithmetic of
    an exported graph (the guided filter's 3x3 inverses by :func:`inverse_3x3`, its per-pixel
    products as broadcast sums), equal to float rounding."""
    unary = torch.log_softmax(logits.float(), -3)
    q = unary.exp()
    side = max(image.shape[-2:])
    sigma = max(settings.spatial_sigma * side, 0.5)
    kernel = 2 * int(3 * sigma) + 1
    radius = max(1, round(settings.guided_radius * side))
    guided = GuidedFilter(image.float(), radius, settings.guided_eps, exported) if settings.iterations else None
    for _ in range(settings.iterations):
        message = settings.spatial_weight * TF.gaussian_blur(q, [kernel, kernel], [sigma, sigma])
        message = message + settings.guided_weight * guided(q)
        q = torch.softmax(unary + message, -3)
    return q
