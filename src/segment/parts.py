"""Prototypes of parts and the per-class choice of which parts are foreground."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def greedy_coreset(vectors: Tensor, count: int, projection_dim: int = 128, seed: int = 0) -> Tensor:
    """Indices of ``count`` rows picked by farthest-point sampling (the PatchCore coreset the
    original uses, SPEC 5.3), on a seeded random projection; starts from the row farthest from
    the mean (deterministic, unlike the original's fresh random projection per call)."""
    n, c = vectors.shape
    count = min(count, n)
    if c > projection_dim:
        g = torch.Generator().manual_seed(seed)
        vectors = vectors @ (torch.randn(c, projection_dim, generator=g) / projection_dim**0.5)
    dist = ((vectors - vectors.mean(0)) ** 2).sum(1)  # (n,) squared distance to the nearest pick so far
    picked = []
    for _ in range(count):
        i = int(dist.argmax())
        picked.append(i)
        dist = torch.minimum(dist, ((vectors - vectors[i]) ** 2).sum(1))
    return torch.tensor(picked)


@dataclass
class Prototypes:
    """k part centres and the spread of the fitted vectors around them."""

    centres: np.ndarray  # (k, C)
    variance: float  # mean squared distance of a fitted vector to its centre
    normalize: bool  # compare L2-normalised features (cosine)

    def prepare(self, features: Tensor) -> Tensor:
        """(..., C) -> the space the centres live in."""
        return torch.nn.functional.normalize(features, dim=-1) if self.normalize else features

    def scores(self, features: Tensor) -> Tensor:
        """(N, C) features -> (N, k) log-likelihood-like scores -d^2 / (2 variance)."""
        centres = torch.from_numpy(self.centres).to(features)
        d2 = torch.cdist(self.prepare(features), centres) ** 2
        return -d2 / (2 * self.variance)

    def to_arrays(self) -> dict:
        return {"centres": self.centres, "variance": np.array(self.variance), "normalize": np.array(self.normalize)}

    @classmethod
    def from_arrays(cls, arrays) -> Prototypes:
        return cls(np.asarray(arrays["centres"]), float(arrays["variance"]), bool(arrays["normalize"]))


def fit_prototypes(vectors: Tensor, k: int, normalize: bool, seed: int = 0, n_init: int = 10) -> Prototypes:
    """k-means (scikit-learn) on (N, C) vectors."""
    if vectors.shape[0] < k:
        raise ValueError(f"only {vectors.shape[0]} feature vectors to fit k={k} part prototypes; lower segment.k "
                         "or raise segment.coreset_ratio")
    from sklearn.cluster import KMeans  # imported here: loading prototypes (checkpoints, predict) needs no scikit-learn

    x = (torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors).double().numpy()
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    variance = max(float(km.inertia_) / len(x), 1e-6)
    return Prototypes(km.cluster_centers_.astype(np.float32), variance, normalize)


@dataclass(frozen=True)
class BackgroundRule:
    """Which part slots of a class are background or noise, decided over its training images.

    The original (SPEC 5.4) decided from the first training image only, by thresholding the
    luma of a JET-coloured JPEG. Here a slot is dropped when, in at least ``vote`` of the
    training images,
    * it covers at least ``border_share`` of the image border (a band ``border`` wide, as a
      fraction of the side): it surrounds the object, so it is background; or
    * it covers less than ``min_area`` of the image: it is noise or absent.
    """

    border_share: float = 0.1
    border: float = 0.02
    min_area: float = 0.002
    vote: float = 0.5

    def select(self, masks: list[np.ndarray]) -> tuple[list[int], dict[int, str]]:
        """Training masks (each (k, H, W) bool) -> kept slot indices and why the others went."""
        k = masks[0].shape[0]
        touching = np.zeros(k)
        small = np.zeros(k)
        for m in masks:
            h, w = m.shape[-2:]
            band = max(1, round(self.border * min(h, w)))
            frame = np.zeros((h, w), bool)
            frame[:band], frame[-band:], frame[:, :band], frame[:, -band:] = True, True, True, True
            touching += m[:, frame].mean(1) >= self.border_share
            small += m.mean((1, 2)) < self.min_area
        n = len(masks)
        dropped = {}
        for c in range(k):
            if touching[c] >= self.vote * n:
                dropped[c] = f"background: covers >= {self.border_share:.0%} of the border in {int(touching[c])}/{n} training images"
            elif small[c] >= self.vote * n:
                dropped[c] = f"noise: under {self.min_area:.1%} of the image in {int(small[c])}/{n} training images"
        return [c for c in range(k) if c not in dropped], dropped
