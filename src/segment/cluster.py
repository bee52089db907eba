"""Route ``cluster`` (the paper's): part prototypes from k-means on training patch features,
refined per-image maps, argmax over parts (SPEC 5.3, with the fixes listed in the README)."""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from src.segment.features import DenseFeatures
from src.segment.parts import Prototypes, fit_prototypes, greedy_coreset
from src.segment.refine import RefineSettings, refine

FEATURE_MEMO_BYTES = 1 << 30  # training features kept between fitting and segmenting (float16)


class ClusterSegmenter:
    """Args:
        features: dense features (backbone tokens or colours).
        coreset_ratio: share of each training image's feature vectors kept by the greedy coreset
            before k-means (the original: 0.01 of a 28 x 28 grid, i.e. 7 vectors).
        refine_settings: the mean-field refinement; ``iterations=0`` skips it.
        seed: coreset projection and k-means seed.
    """

    route = "cluster"

    def __init__(self, features: DenseFeatures, coreset_ratio: float = 0.1, refine_settings: RefineSettings | None = None,
                 seed: int = 0) -> None:
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"segment.coreset_ratio={coreset_ratio}; use a share in (0, 1]")
        self.features = features
        self.coreset_ratio = coreset_ratio
        self.refine_settings = refine_settings or RefineSettings()
        self.seed = seed
        self._grids: dict[str, Tensor] = {}  # training images' features from fit(), used once by segment()

    def _features(self, image: Tensor, keep: bool = False) -> Tensor:
        key = hashlib.sha1(image.numpy().tobytes()).hexdigest()
        if key in self._grids:
            return self._grids.pop(key).float()
        grid = self.features(image)
        if keep and sum(g.numel() * 2 for g in self._grids.values()) < FEATURE_MEMO_BYTES:
            self._grids[key] = grid.half()
        return grid

    def describe(self) -> dict:
        return {"features": self.features.describe(), "coreset_ratio": self.coreset_ratio,
                "refine": vars(self.refine_settings), "seed": self.seed}

    def fit(self, images: list[Tensor], k: int) -> Prototypes:
        """Prototypes of k parts from the training images ((3, H, W) in [0, 1] each)."""
        picked = []
        self._grids = {}
        for image in images:
            grid = self._features(image, keep=True)  # (C, h, w)
            vectors = grid.flatten(1).T  # (h*w, C)
            if self.features.normalize:
                vectors = F.normalize(vectors, dim=-1)
            count = max(1, math.ceil(self.coreset_ratio * vectors.shape[0]))
            picked.append(vectors[greedy_coreset(vectors, count, seed=self.seed)])
        return fit_prototypes(torch.cat(picked), k, self.features.normalize, self.seed)

    def features(self, image: Tensor) -> Tensor:
        """(C, h, w) dense features of one (3, H, W) image in [0, 1]."""
        return self._features(image)

    def segment(self, prototypes: Prototypes, image: Tensor, grid: Tensor | None = None) -> Tensor:
        """(k, H, W) bool masks of one (3, H, W) image: one slot per prototype, disjoint.
        ``grid``: the image's features, when already computed (:meth:`features`)."""
        grid = self._features(image) if grid is None else grid  # (C, h, w)
        c, h, w = grid.shape
        scores = prototypes.scores(grid.flatten(1).T).T.reshape(-1, h, w)  # (k, h, w)
        device = getattr(self.features, "device", "cpu")  # refine where the features were computed
        scores = F.interpolate(scores[None].to(device), size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
        probabilities = refine(scores, image.to(device), self.refine_settings)
        labels = probabilities.argmax(0).cpu()  # (H, W)
        return labels[None] == torch.arange(scores.shape[0])[:, None, None]
