"""The one scoring path: the model's raw group maps and normalisation statistics -> final anomaly
maps, image scores and decisions.

Test (both protocols), calibration and prediction all score an image with :class:`Scorer`: the
streaming evaluator (:mod:`src.evaluation.evaluator`) stores ``L(M)`` per group and applies the
statistics at the end (:func:`src.evaluation.protocol.combine_groups`), prediction applies them
at once; both go through :meth:`Scorer.final_maps` and :meth:`Scorer.image_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from src.evaluation.calibration import NormalStatistics
from src.evaluation.protocol import combine_groups, resize_and_smooth, top_percent_score
from src.models.outputs import MoEPrediction


def raw_groups(prediction: MoEPrediction) -> Tensor:
    """(B, 3, H, W): the patch, global and component raw maps."""
    return torch.cat([prediction.map_patch, prediction.map_global, prediction.map_component], dim=1)


@dataclass
class ScoredImages:
    final: Tensor  # (B, 1, S, S) final anomaly maps
    scores: Tensor  # (B,) image scores
    anomalous: Tensor | None  # (B,) bool: score >= threshold (None without a threshold)


@dataclass(frozen=True)
class Scorer:
    """The protocol of SPEC 8.2 for fixed normalisation statistics: resize to ``eval_size``,
    Gaussian smoothing (``kernel_size``, ``sigma``), per-group min-max normalisation weighted by
    the routing, image score = mean of the top ``top_fraction`` pixels."""

    eval_size: int = 256
    kernel_size: int = 5
    sigma: float = 4.0
    top_fraction: float = 0.01

    def smooth(self, maps: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 1, S, S): ``L(M)``."""
        return resize_and_smooth(maps, self.eval_size, self.kernel_size, self.sigma)

    def smoothed_groups(self, raw: Tensor) -> Tensor:
        """(B, G, H, W) raw group maps -> (B, G, S, S) resized and smoothed."""
        b, g = raw.shape[:2]
        return self.smooth(raw.reshape(b * g, 1, *raw.shape[-2:])).reshape(b, g, self.eval_size, self.eval_size)

    def final_maps(self, smoothed: Tensor, low: Tensor, high: Tensor, group_weights: Tensor) -> Tensor:
        """(N, G, S, S) smoothed group maps, (G,) or (N, G) statistics, (N, G) routing -> (N, 1, S, S)."""
        ones = self.smooth(torch.ones(1, 1, 2, 2, device=smoothed.device, dtype=smoothed.dtype))  # padding's border
        return combine_groups(smoothed, low, high, group_weights, ones)

    def image_scores(self, final: Tensor) -> Tensor:
        """(N, 1, S, S) final maps -> (N,) image scores."""
        return top_percent_score(final, self.top_fraction)

    def score(self, prediction: MoEPrediction, stats: NormalStatistics) -> ScoredImages:
        """Final maps, scores and decisions of a batch with one class's statistics (each image on its own)."""
        raw = raw_groups(prediction)
        low, high = (t.to(raw) for t in stats.tensors())
        final = self.final_maps(self.smoothed_groups(raw), low, high, prediction.group_weights)
        scores = self.image_scores(final)
        return ScoredImages(final, scores, scores >= stats.threshold)
