"""Metrics against references: sklearn where it has the metric, a brute-force AUPRO, hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from src.evaluation.metrics import PixelHistograms, image_metrics, pixel_metrics, region_weights, trapezoid_up_to


def brute_force_aupro(maps: np.ndarray, gt: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AUPRO by definition: every distinct value is a threshold, regions labelled per image."""
    regions = []
    for m, g in zip(maps, gt):
        labels, count = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [(m[labels == r]) for r in range(1, count + 1)]
    normal = maps[~gt]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float((normal >= t).mean()))
        pros.append(float(np.mean([(r >= t).mean() for r in regions])))
    fprs, pros = np.array(fprs), np.array(pros)
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= limit:
            break
        if x1 > limit:  # interpolate at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def sklearn_f1max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    return float(f1.max())


def histograms(maps: torch.Tensor, gt: torch.Tensor, bins: int = 65536) -> PixelHistograms:
    h = PixelHistograms(float(maps.min()), float(maps.max()), bins)
    for i in range(0, maps.shape[0], 2):  # streamed, two images at a time
        h.update(maps[i : i + 2], gt[i : i + 2])
    return h


def random_class(seed: int, n: int = 6, size: int = 32, quantised: bool = False):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size, size, generator=g)
    gt = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n // 2, n):  # blobs of different sizes, some images with two regions
        y, x = torch.randint(0, size - 10, (2,), generator=g).tolist()
        h, w = torch.randint(2, 9, (2,), generator=g).tolist()
        gt[i, y : y + h, x : x + w] = True
        if i % 2:
            gt[i, 0:2, size - 3 : size] = True
        maps[i][gt[i]] += 0.4 * torch.rand(int(gt[i].sum()), generator=g)
    if quantised:  # few distinct values: every value gets its own bin
        maps = (maps * 20).round() / 20
    return maps, gt


def test_image_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 20)
    scores = torch.rand(50, generator=g) + 0.3 * labels
    scores[3] = scores[40]  # a tie across labels
    metrics, notes = image_metrics(scores, labels)
    y, s = labels.numpy(), scores.numpy()
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert metrics["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert metrics["image_f1max"] == pytest.approx(sklearn_f1max(y, s), abs=1e-6)
    assert notes == []


@pytest.mark.parametrize("quantised", [True, False])
def test_pixel_metrics_match_sklearn_and_brute_force_aupro(quantised):
    maps, gt = random_class(1, quantised=quantised)
    metrics, threshold, notes = pixel_metrics(histograms(maps, gt))
    y, s = gt.flatten().numpy(), maps.flatten().numpy()
    # Exact on values that fall into distinct bins; within binning error otherwise.
    tol = 1e-9 if quantised else 2e-5
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=tol)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=tol)
    assert metrics["pixel_f1max"] == pytest.approx(sklearn_f1max(y, s), abs=tol)
    assert metrics["pixel_aupro"] == pytest.approx(brute_force_aupro(maps.numpy(), gt.numpy()), abs=tol)
    predicted = maps >= threshold  # the F1-max threshold reproduces the F1-max
    tp = (predicted & gt).sum().item()
    assert 2 * tp / (predicted.sum().item() + gt.sum().item()) == pytest.approx(metrics["pixel_f1max"], abs=1e-3)
    assert notes == []


def test_aupro_hand_computed():
    # One row of 10 pixels: region A = pixels 0-1, region B = pixel 5 (not touching).
    maps = torch.tensor([[[0.9, 0.2, 0.1, 0.1, 0.5, 0.9, 0.1, 0.1, 0.1, 0.1]]])
    gt = torch.zeros_like(maps, dtype=torch.bool)
    gt[0, 0, [0, 1, 5]] = True
    metrics, _, _ = pixel_metrics(histograms(maps, gt, bins=1024))
    # Curve (FPR, PRO): (0, 0) (0, .75) (1/7, .75) (1/7, 1) (1, 1); area to 0.3 = .75/7 + (0.3 - 1/7).
    assert metrics["pixel_aupro"] == pytest.approx((0.75 / 7 + (0.3 - 1 / 7)) / 0.3, abs=1e-12)
    assert metrics["pixel_auroc"] == pytest.approx(20 / 21, abs=1e-12)  # 20 of 21 (anomalous, normal) pairs ordered


def test_aupro_perfect_and_inverted_maps():
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[1, 2:5, 2:5] = True
    perfect, _, _ = pixel_metrics(histograms(gt.float(), gt))
    inverted, _, _ = pixel_metrics(histograms(1 - gt.float(), gt))
    assert perfect["pixel_aupro"] == 1.0 and perfect["pixel_auroc"] == 1.0 and perfect["pixel_f1max"] == 1.0
    assert inverted["pixel_aupro"] == 0.0 and inverted["pixel_auroc"] == 0.0


def test_regions_are_eight_connected_and_per_image():
    gt = torch.zeros(2, 6, 6, dtype=torch.bool)
    gt[0, 0, 0] = gt[0, 1, 1] = True  # diagonal neighbours: one region of 2
    gt[0, 4:6, 4:6] = True  # a second region of 4
    gt[1, 0, 0] = True  # same place, other image: its own region
    weights, count = region_weights(gt)
    assert count == 3
    assert weights[0, 0, 0] == 0.5 and weights[0, 5, 5] == 0.25 and weights[1, 0, 0] == 1.0
    assert weights[~gt].abs().sum() == 0


def test_no_anomalous_images_gives_notes_not_nan():
    maps = torch.rand(3, 8, 8)
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    image, image_notes = image_metrics(maps.flatten(1).amax(1), torch.zeros(3))
    pixel, threshold, pixel_notes = pixel_metrics(histograms(maps, gt))
    assert all(v is None for v in {**image, **pixel}.values()) and threshold is None
    assert "no anomalous images among 3" in image_notes[0]
    assert "no anomalous pixels" in pixel_notes[0]


def test_all_zero_maps_are_ties_with_a_note():
    gt = torch.zeros(4, 8, 8, dtype=torch.bool)
    gt[2:, 1:3, 1:3] = True
    pixel, _, notes = pixel_metrics(histograms(torch.zeros(4, 8, 8), gt))
    p = gt.float().mean().item()
    assert pixel["pixel_auroc"] == 0.5 and pixel["pixel_ap"] == pytest.approx(p)
    assert pixel["pixel_f1max"] == pytest.approx(2 * p / (1 + p))
    assert pixel["pixel_aupro"] == pytest.approx(0.15)  # PRO = FPR on the diagonal: 0.3^2 / 2 / 0.3
    assert "all anomaly-map values equal 0" in notes[0]
    image, image_notes = image_metrics(torch.zeros(4), torch.tensor([0, 0, 1, 1]))
    assert image["image_auroc"] == 0.5 and "all image scores are equal" in image_notes[0]


def test_trapezoid_up_to_interpolates_at_the_limit():
    x, y = torch.tensor([0.0, 0.2, 0.4, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert trapezoid_up_to(x, y, 0.3) == pytest.approx(0.1 + 0.1)
    assert trapezoid_up_to(x, y, 0.2) == pytest.approx(0.1)


def test_histogram_state_round_trip_sums_like_one_pass():
    maps, gt = random_class(2)
    whole = histograms(maps, gt)
    a, b = PixelHistograms(whole.low, whole.high), PixelHistograms(whole.low, whole.high)
    a.update(maps[:3], gt[:3])
    b.update(maps[3:], gt[3:])
    merged = PixelHistograms(whole.low, whole.high)
    merged.load_state(a.state() + b.state())  # what a distributed sum does
    assert pixel_metrics(merged)[0] == pixel_metrics(whole)[0]
