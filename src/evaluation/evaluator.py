"""Streaming, DDP-aware evaluation of the original protocol (SPEC 8.2), per class."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from src.evaluation.protocol import combine_groups, resize_and_smooth, resize_ground_truth, top_percent_score
from src.models.anomalymoe import MoEPrediction

log = logging.getLogger(__name__)


@dataclass
class ClassEvaluation:
    """Everything computed for one class."""

    sample_index: Tensor  # (N,) dataset indices, sorted
    labels: Tensor  # (N,) 0 normal / 1 anomalous
    image_scores: Tensor  # (N,)
    final_maps: Tensor  # (N, 1, S, S) final anomaly maps
    gt_masks: Tensor  # (N, 1, S, S) bool
    metrics: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why a metric is undefined


def auroc_or_none(scores: Tensor, targets: Tensor, what: str, notes: list[str]) -> float | None:
    """AUROC, or ``None`` with a note when only one class is present."""
    positives = int(targets.sum())
    if positives == 0 or positives == targets.numel():
        notes.append(f"{what} AUROC undefined: {'no' if positives == 0 else 'only'} anomalous samples")
        return None
    return float(binary_auroc(scores.float(), targets.long()))


class PaperProtocolEvaluator(Metric):
    """Collects per-image statistics; ``compute()`` applies the per-class protocol.

    Reads from the batch: ``index`` (dataset index, removes DDP padding duplicates),
    ``class_index``, ``label`` and ``gt_mask`` (B, 1, H, W).
    """

    fields = ("index", "class_index", "label", "gt_mask")
    full_state_update = False

    def __init__(self, eval_size: int = 256, kernel_size: int = 5, sigma: float = 4.0, top_fraction: float = 0.01) -> None:
        super().__init__()
        self.eval_size, self.kernel_size, self.sigma, self.top_fraction = eval_size, kernel_size, sigma, top_fraction
        for name in ("sample_index", "class_index", "label", "smoothed", "minimum", "maximum", "group_weights", "gt"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _smooth(self, maps: Tensor) -> Tensor:
        return resize_and_smooth(maps, self.eval_size, self.kernel_size, self.sigma)

    def update(self, prediction: MoEPrediction, batch: dict) -> None:  # type: ignore[override]
        raw = torch.cat([prediction.map_patch, prediction.map_global, prediction.map_component], dim=1)  # (B, 3, H, W)
        b, g = raw.shape[:2]
        self.smoothed.append(self._smooth(raw.reshape(b * g, 1, *raw.shape[-2:])).reshape(b, g, self.eval_size, self.eval_size))
        self.minimum.append(raw.amin(dim=(2, 3)))
        self.maximum.append(raw.amax(dim=(2, 3)))
        self.group_weights.append(prediction.group_weights)
        self.gt.append(resize_ground_truth(batch["gt_mask"], self.eval_size).squeeze(1))
        self.sample_index.append(batch["index"])
        self.class_index.append(batch["class_index"])
        self.label.append(batch["label"])

    def compute(self) -> dict[int, ClassEvaluation]:
        if not self.sample_index:
            return {}
        index = dim_zero_cat(self.sample_index)
        # DistributedSampler pads with repeated samples: keep each dataset index once.
        order = torch.argsort(index, stable=True)
        keep = order[torch.cat([torch.tensor([True], device=index.device), index[order][1:] != index[order][:-1]])]
        state = {
            name: dim_zero_cat(getattr(self, name))[keep]
            for name in ("sample_index", "class_index", "label", "smoothed", "minimum", "maximum", "group_weights", "gt")
        }
        ones = self._smooth(torch.ones(1, 1, 2, 2, device=index.device))  # border effect of zero padding
        results = {}
        for cls in state["class_index"].unique().tolist():
            sel = state["class_index"] == cls
            final = combine_groups(
                state["smoothed"][sel],
                state["minimum"][sel].amin(0),
                state["maximum"][sel].amax(0),
                state["group_weights"][sel],
                ones,
            )
            scores = top_percent_score(final, self.top_fraction)
            labels, gt = state["label"][sel], state["gt"][sel].unsqueeze(1)
            notes: list[str] = []
            metrics = {
                "image_auroc": auroc_or_none(scores, labels, "image", notes),
                "pixel_auroc": auroc_or_none(final.flatten(), gt.flatten(), "pixel", notes),
            }
            results[cls] = ClassEvaluation(state["sample_index"][sel], labels, scores, final, gt, metrics, notes)
        return results
