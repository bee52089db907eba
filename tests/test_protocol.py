"""The paper's evaluation protocol: streamed computation equals the original order of operations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from src.evaluation.calibration import Calibration, NormalStatistics
from src.evaluation.evaluator import AnomalyEvaluator, NormalCalibrator
from src.evaluation.metrics import METRICS
from src.evaluation.protocol import gaussian_kernel, top_percent_score
from src.models.anomalymoe import MoEPrediction


def reference_protocol(maps, weights, gt, size=256, stats=None):
    """SPEC 8.2 exactly as the original orders it, on whole-class tensors; ``stats`` = (low, high)
    per group replaces the class's own extremes (inductive protocol)."""
    lows = [m.min() for m in maps] if stats is None else stats[0]
    highs = [m.max() for m in maps] if stats is None else stats[1]
    normed = [(m - lo) / (hi - lo + 1e-11) for m, lo, hi in zip(maps, lows, highs)]
    combined = sum(w[:, None, None, None] * m for w, m in zip(weights.T, normed))
    combined = F.interpolate(combined, size=(size, size), mode="bilinear")
    kernel = gaussian_kernel(5, 4.0)
    final = F.conv2d(combined, kernel, padding=2)
    k = max(1, int(0.01 * size * size))
    scores = final.flatten(1).topk(k, dim=1).values.mean(1)
    gt256 = F.interpolate(gt.float(), size=(size, size), mode="nearest") > 0
    return final, scores, gt256


def make_class(n, size=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.rand(n, 1, size, size, generator=g) * s for s in (1.0, 0.01, 0.5)]
    weights = torch.rand(n, 3, generator=g)
    weights[0, 2] = 0.0  # an image with no component expert selected
    gt = torch.zeros(n, 1, size, size)
    labels = torch.zeros(n, dtype=torch.long)
    for i in range(n // 2, n):
        gt[i, :, 10:20, 15:30] = 1
        labels[i] = 1
        for m in maps:
            m[i, :, 10:20, 15:30] += 0.3
    return maps, weights, gt, labels


def feed(evaluator, maps, weights, gt, labels, class_index, offset, chunks):
    n = labels.numel()
    for idx in torch.arange(n).chunk(chunks):
        pred = MoEPrediction(maps[0][idx], maps[1][idx], maps[2][idx], torch.zeros(len(idx), 3), torch.zeros(len(idx), 3),
                             weights[idx])
        evaluator.update(pred, {"index": idx + offset, "class_index": torch.full((len(idx),), class_index),
                                "label": labels[idx], "gt_mask": gt[idx]})


def kept_in_index_order(result):
    order = torch.argsort(result.example_index)
    return result.example_maps[order], result.example_gt[order]


def check_against_reference(result, final, scores, gt256, labels):
    maps, gts = kept_in_index_order(result)
    torch.testing.assert_close(maps, final, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(result.image_scores, scores, atol=2e-6, rtol=1e-5)
    assert torch.equal(gts, gt256)
    assert abs(result.metrics["image_auroc"] - roc_auc_score(labels.numpy(), scores.numpy())) < 1e-6
    assert abs(result.metrics["image_ap"] - average_precision_score(labels.numpy(), scores.numpy())) < 1e-6
    y, s = gt256.flatten().numpy(), final.flatten().numpy()
    assert abs(result.metrics["pixel_auroc"] - roc_auc_score(y, s)) < 5e-5  # 65,536-bin histograms
    assert abs(result.metrics["pixel_ap"] - average_precision_score(y, s)) < 5e-5


@pytest.mark.parametrize("memory_budget_mb", [512, 0])  # 0: every chunk goes through a temporary file
def test_streamed_protocol_equals_reference(memory_budget_mb):
    evaluator = AnomalyEvaluator(keep_maps=10, memory_budget_mb=memory_budget_mb)
    classes = [make_class(6, seed=0), make_class(5, seed=1)]
    offset = 0
    for c, (maps, weights, gt, labels) in enumerate(classes):
        feed(evaluator, maps, weights, gt, labels, c, offset, chunks=3)
        offset += labels.numel()
    assert evaluator.store.spilled_chunks == (6 if memory_budget_mb == 0 else 0)
    results = evaluator.evaluate()
    for c, (maps, weights, gt, labels) in enumerate(classes):
        check_against_reference(results[c], *reference_protocol(maps, weights, gt), labels)


def inductive_result(maps, weights, gt, labels, low, high):
    """Fixed statistics and the inductive evaluator's result for one class (kept maps: all)."""
    stats = NormalStatistics(low=low, high=high, threshold=0.0, num_images=1, score_mean=0, score_max=0)
    evaluator = AnomalyEvaluator(protocol="inductive", keep_maps=labels.numel())
    evaluator.normalization = {0: stats}
    feed(evaluator, maps, weights, gt, labels, 0, 0, chunks=2)
    return stats, evaluator.evaluate()[0]


def test_inductive_protocol_uses_normal_statistics_and_scores_images_alone():
    maps, weights, gt, labels = make_class(6)
    stats, result = inductive_result(maps, weights, gt, labels, low=[0.0, 0.0, 0.0], high=[0.8, 0.02, 0.4])
    check_against_reference(result, *reference_protocol(maps, weights, gt, stats=(stats.low, stats.high)), labels)
    # One image alone gets the same score; under the paper protocol it does not.
    alone = {}
    for protocol in ("inductive", "paper"):
        single = AnomalyEvaluator(protocol=protocol)
        single.normalization = {0: stats}
        feed(single, [m[4:5] for m in maps], weights[4:5], gt[4:5], labels[4:5], 0, 4, chunks=1)
        alone[protocol] = single.evaluate()[0].image_scores[0]
    assert alone["inductive"] == pytest.approx(float(result.image_scores[4]), abs=1e-6)
    # The paper protocol normalises a lone image by its own extremes: a different score.
    assert alone["paper"] == pytest.approx(float(reference_protocol([m[4:5] for m in maps], weights[4:5], gt[4:5])[1][0]))
    assert abs(alone["paper"] - float(reference_protocol(maps, weights, gt)[1][4])) > 1e-3


def test_calibration_statistics_and_threshold():
    normal_a, weights_a, _, _ = make_class(4, seed=3)
    normal_b, weights_b, _, _ = make_class(4, seed=4)
    normal_b = [m * 2 for m in normal_b]
    calibrator = NormalCalibrator(quantile=1.0, memory_budget_mb=0)
    calibrator.class_keys = ["demo/a", "demo/b"]
    for c, (maps, weights) in enumerate([(normal_a, weights_a), (normal_b, weights_b)]):
        pred = MoEPrediction(*maps, torch.zeros(4, 3), torch.zeros(4, 3), weights)
        calibrator.update(pred, {"index": torch.arange(4) + 4 * c, "class_index": torch.full((4,), c),
                                 "label": torch.zeros(4)})
    calibration = calibrator.evaluate()
    assert set(calibration.stats) == {"demo/a", "demo/b", "all"}
    for key, maps, weights in (("demo/a", normal_a, weights_a), ("demo/b", normal_b, weights_b)):
        stats = calibration.stats[key]
        assert stats.low == pytest.approx([float(m.min()) for m in maps])
        assert stats.high == pytest.approx([float(m.max()) for m in maps])
        _, scores, _ = reference_protocol(maps, weights, torch.zeros(4, 1, 8, 8))
        assert stats.threshold == pytest.approx(float(scores.max()), abs=1e-6) and stats.num_images == 4
    pooled = calibration.stats["all"]
    assert pooled.high == pytest.approx([max(float(a.max()), float(b.max())) for a, b in zip(normal_a, normal_b)])
    assert pooled.num_images == 8 and "largest image score" in calibration.rule
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_non_finite_maps_are_an_error_naming_the_image():
    maps, weights, gt, labels = make_class(2)
    maps[0][1, 0, 0, 0] = float("nan")
    evaluator = AnomalyEvaluator()
    pred = MoEPrediction(*maps, torch.zeros(2, 3), torch.zeros(2, 3), weights)
    with pytest.raises(FloatingPointError, match="b.png"):
        evaluator.update(pred, {"index": torch.arange(2), "class_index": torch.zeros(2, dtype=torch.long),
                                "label": labels, "gt_mask": gt, "image_path": ["a.png", "b.png"]})


def test_duplicates_from_distributed_padding_are_counted_once():
    maps, weights, gt, labels = make_class(4)
    once, twice = AnomalyEvaluator(), AnomalyEvaluator()
    feed(once, maps, weights, gt, labels, 0, 0, chunks=2)
    feed(twice, maps, weights, gt, labels, 0, 0, chunks=2)
    feed(twice, [m[:1] for m in maps], weights[:1], gt[:1], labels[:1], 0, 0, chunks=1)  # repeated sample 0
    a, b = once.evaluate()[0], twice.evaluate()[0]
    assert b.labels.numel() == 4
    torch.testing.assert_close(a.image_scores, b.image_scores)
    assert a.metrics == b.metrics


def test_undefined_metrics_are_reported_not_nan():
    maps, weights, gt, labels = make_class(4)
    evaluator = AnomalyEvaluator()
    normal = torch.arange(2)  # only the normal half
    feed(evaluator, [m[normal] for m in maps], weights[normal], gt[normal], labels[normal], 0, 0, chunks=1)
    result = evaluator.evaluate()[0]
    assert set(result.metrics) == set(METRICS) and all(v is None for v in result.metrics.values())
    assert any("no anomalous images" in note for note in result.notes)
    assert any("no anomalous pixels" in note for note in result.notes)


def test_gaussian_kernel_weights():
    k = gaussian_kernel(5, 4.0)
    assert torch.isclose(k.sum(), torch.tensor(1.0))
    one_d = k[0, 0].sum(0)
    torch.testing.assert_close(one_d, torch.tensor([0.18763, 0.20607, 0.21261, 0.20607, 0.18763]), atol=1e-5, rtol=0)


def test_top_percent_score():
    maps = torch.arange(10000, dtype=torch.float32).reshape(1, 1, 100, 100)
    assert top_percent_score(maps, 0.01).item() == sum(range(9900, 10000)) / 100


def test_scoring_one_batch_equals_the_inductive_evaluator():
    maps, weights, gt, labels = make_class(4)
    stats, result = inductive_result(maps, weights, gt, labels, low=[0.1, 0.0, 0.0], high=[0.9, 0.02, 0.4])
    scored = NormalCalibrator().score(MoEPrediction(*maps, torch.zeros(4, 3), torch.zeros(4, 3), weights), stats)
    final, scores = scored.final, scored.scores
    torch.testing.assert_close(scores, result.image_scores)
    torch.testing.assert_close(final, kept_in_index_order(result)[0])
