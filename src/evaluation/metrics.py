"""Anomaly-detection metrics: image level from scores, pixel level from streamed histograms.

Metric names (``{image|pixel}_{metric}``): ``image_auroc``, ``image_ap``, ``image_f1max``,
``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``pixel_aupro``.

* Image level: one score per image, computed exactly with torchmetrics.
* Pixel level: a class may have thousands of 256 x 256 maps, so no metric holds them. Each
  pixel value falls into one of ``num_bins`` equal-width bins over the class's value range and
  three histograms are summed image by image: normal pixels, anomalous pixels, and anomalous
  pixels weighted by ``1 / |region|`` (each connected ground-truth region counts once, for
  PRO). A threshold at every bin edge then gives the ROC, PR and PRO curves of the class in
  O(bins) memory. Values that share a bin are ties, so the numbers equal the exact ones for the
  values rounded down to their bin edge (tests: within 1e-5 of sklearn with 65,536 bins).
  torchmetrics' own binned mode compares every pixel with every threshold (pixels x thresholds
  work), which is why the curves are built here from the histograms.

AUPRO is the MVTec AD definition: for each threshold, the mean over all ground-truth regions
(8-connected, per image) of the fraction of the region above the threshold, against the
false-positive rate over all normal pixels; the area under that curve up to FPR 0.3 (linearly
interpolated at 0.3), divided by 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS


def f1_max(precision: Tensor, recall: Tensor) -> tuple[float, int]:
    """Largest F1 over a precision-recall curve and its position (0 where P + R = 0)."""
    f1 = 2 * precision * recall / (precision + recall)
    f1 = torch.nan_to_num(f1, nan=0.0)
    best = int(torch.argmax(f1))
    return float(f1[best]), best


def image_metrics(scores: Tensor, labels: Tensor) -> tuple[dict[str, float | None], list[str]]:
    """AUROC, AP and F1-max of image scores (torchmetrics, exact); ``None`` with a note when undefined."""
    notes: list[str] = []
    labels = labels.long().cpu()
    scores = scores.float().cpu()
    positives = int(labels.sum())
    if positives == 0 or positives == labels.numel():
        notes.append(
            f"image metrics undefined: {'no' if positives == 0 else 'only'} anomalous images among {labels.numel()}"
        )
        return dict.fromkeys(IMAGE_METRICS), notes
    if bool((scores == scores[0]).all()):
        notes.append("all image scores are equal: image metrics are those of a random ranking")
    precision, recall, _ = binary_precision_recall_curve(scores, labels)
    return {
        "image_auroc": float(binary_auroc(scores, labels)),
        "image_ap": float(binary_average_precision(scores, labels)),
        "image_f1max": f1_max(precision, recall)[0],
    }, notes


def region_weights(gt: Tensor) -> tuple[Tensor, int]:
    """Per-pixel ``1 / |region|`` of the 8-connected ground-truth regions of (N, H, W) masks.

    Returns the (N, H, W) float64 weights (0 outside regions) and the number of regions.
    Regions never connect across images.
    """
    mask = gt.bool().cpu().numpy()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity within an image only
    labels, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return torch.zeros(mask.shape, dtype=torch.float64), 0
    sizes = np.bincount(labels.ravel())
    inverse = np.zeros(count + 1, dtype=np.float64)
    inverse[1:] = 1.0 / sizes[1:]
    return torch.from_numpy(inverse[labels]), int(count)


@dataclass
class PixelHistograms:
    """Pixel counts of one class in ``num_bins`` equal-width bins over ``[low, high]``.

    ``normal`` / ``anomalous``: pixel counts per bin; ``regions``: anomalous pixels weighted by
    ``1 / |region|``; ``num_regions``: ground-truth regions seen. Counts are float64 (exact up
    to 2**53) so that the whole state is one tensor for a distributed sum.
    """

    low: float
    high: float
    num_bins: int = 65536
    normal: Tensor = field(init=False)
    anomalous: Tensor = field(init=False)
    regions: Tensor = field(init=False)
    num_regions: int = 0

    def __post_init__(self) -> None:
        for name in ("normal", "anomalous", "regions"):
            setattr(self, name, torch.zeros(self.num_bins, dtype=torch.float64))

    def bins(self, values: Tensor) -> Tensor:
        """Bin index of each value; values outside ``[low, high]`` go to the end bins."""
        span = self.high - self.low
        if span <= 0:
            return torch.zeros(values.shape, dtype=torch.long)
        index = ((values.double() - self.low) * (self.num_bins / span)).floor().long()
        return index.clamp_(0, self.num_bins - 1)

    def update(self, maps: Tensor, gt: Tensor) -> None:
        """Add (N, H, W) maps with their (N, H, W) boolean ground truth."""
        maps, gt = maps.detach().cpu(), gt.bool().cpu()
        bins = self.bins(maps)
        counts = torch.bincount((bins + self.num_bins * gt).flatten(), minlength=2 * self.num_bins).double()
        self.normal += counts[: self.num_bins]
        self.anomalous += counts[self.num_bins :]
        if bool(gt.any()):
            weights, count = region_weights(gt)
            self.regions += torch.bincount(bins[gt], weights=weights[gt], minlength=self.num_bins)
            self.num_regions += count

    def state(self) -> Tensor:
        """(3 * num_bins + 1,) float64: everything a distributed sum needs."""
        return torch.cat([self.normal, self.anomalous, self.regions, torch.tensor([float(self.num_regions)], dtype=torch.float64)])

    def load_state(self, state: Tensor) -> None:
        b = self.num_bins
        self.normal, self.anomalous, self.regions = state[:b].clone(), state[b : 2 * b].clone(), state[2 * b : 3 * b].clone()
        self.num_regions = int(round(float(state[-1])))

    def threshold(self, position: int) -> float:
        """The value of the bin edge at ``position`` of the curves of :func:`pixel_metrics`."""
        edge = self.num_bins - position  # curves start above the top bin
        return self.low + (self.high - self.low) * edge / self.num_bins


def trapezoid_up_to(x: Tensor, y: Tensor, limit: float) -> float:
    """Area under a curve with non-decreasing ``x`` from ``x[0]`` to ``limit`` (linear interpolation at the limit)."""
    x, y = x.double(), y.double()
    inside = int(torch.searchsorted(x, torch.tensor([limit], dtype=x.dtype), right=True))
    area = float(torch.trapezoid(y[:inside], x[:inside])) if inside > 1 else 0.0
    if inside < len(x) and x[inside - 1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += float(0.5 * (y0 + y_limit) * (limit - x0))
    return area


def pixel_metrics(h: PixelHistograms, fpr_limit: float = 0.3) -> tuple[dict[str, float | None], float | None, list[str]]:
    """Pixel AUROC, AP, F1-max and AUPRO from histograms.

    Returns the metrics (``None`` with a note when undefined), the threshold of the best pixel
    F1 (for predicted masks) and the notes.
    """
    notes: list[str] = []
    positives, negatives = float(h.anomalous.sum()), float(h.normal.sum())
    if positives == 0 or negatives == 0:
        notes.append(f"pixel metrics undefined: {'no' if positives == 0 else 'only'} anomalous pixels")
        return dict.fromkeys(PIXEL_METRICS), None, notes
    if h.high <= h.low:
        notes.append(f"all anomaly-map values equal {h.low:.4g}: pixel metrics are those of a random ranking")
    # Thresholds from above the top bin down to the bottom edge: cumulative counts from the top.
    zero = torch.zeros(1, dtype=torch.float64)
    tp = torch.cat([zero, h.anomalous.flip(0).cumsum(0)])
    fp = torch.cat([zero, h.normal.flip(0).cumsum(0)])
    pro = torch.cat([zero, h.regions.flip(0).cumsum(0)]) / max(h.num_regions, 1)
    tpr, fpr = tp / positives, fp / negatives
    predicted = tp + fp
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.ones_like(tp))
    f1, best = f1_max(precision, tpr)
    metrics = {
        "pixel_auroc": float(torch.trapezoid(tpr, fpr)),
        "pixel_ap": float(((tpr[1:] - tpr[:-1]) * precision[1:]).sum()),  # step sum, as sklearn / torchmetrics
        "pixel_f1max": f1,
        "pixel_aupro": trapezoid_up_to(fpr, pro.clamp(max=1.0), fpr_limit) / fpr_limit,
    }
    return metrics, h.threshold(best), notes
