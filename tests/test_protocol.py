"""The paper's evaluation protocol: streamed computation equals the original order of operations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from src.evaluation.evaluator import PaperProtocolEvaluator
from src.evaluation.protocol import gaussian_kernel, top_percent_score
from src.models.anomalymoe import MoEPrediction


def reference_protocol(maps, weights, gt, size=256):
    """SPEC 8.2 exactly as the original orders it, on whole-class tensors."""
    normed = [(m - m.min()) / (m.max() - m.min() + 1e-11) for m in maps]
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


def test_streamed_protocol_equals_reference():
    evaluator = PaperProtocolEvaluator()
    classes = [make_class(6, seed=0), make_class(5, seed=1)]
    offset = 0
    for c, (maps, weights, gt, labels) in enumerate(classes):
        feed(evaluator, maps, weights, gt, labels, c, offset, chunks=3)
        offset += labels.numel()
    results = evaluator.compute()
    for c, (maps, weights, gt, labels) in enumerate(classes):
        final, scores, gt256 = reference_protocol(maps, weights, gt)
        res = results[c]
        torch.testing.assert_close(res.final_maps, final, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(res.image_scores, scores, atol=2e-6, rtol=1e-5)
        assert torch.equal(res.gt_masks, gt256)
        assert abs(res.metrics["image_auroc"] - roc_auc_score(labels.numpy(), scores.numpy())) < 1e-6
        expected_pixel = roc_auc_score(gt256.flatten().numpy(), final.flatten().numpy())
        assert abs(res.metrics["pixel_auroc"] - expected_pixel) < 1e-6


def test_duplicates_from_distributed_padding_are_counted_once():
    maps, weights, gt, labels = make_class(4)
    once, twice = PaperProtocolEvaluator(), PaperProtocolEvaluator()
    feed(once, maps, weights, gt, labels, 0, 0, chunks=2)
    feed(twice, maps, weights, gt, labels, 0, 0, chunks=2)
    feed(twice, [m[:1] for m in maps], weights[:1], gt[:1], labels[:1], 0, 0, chunks=1)  # repeated sample 0
    a, b = once.compute()[0], twice.compute()[0]
    assert b.labels.numel() == 4
    torch.testing.assert_close(a.image_scores, b.image_scores)


def test_undefined_auroc_is_reported_not_nan():
    maps, weights, gt, labels = make_class(4)
    evaluator = PaperProtocolEvaluator()
    normal = torch.arange(2)  # only the normal half
    feed(evaluator, [m[normal] for m in maps], weights[normal], gt[normal], labels[normal], 0, 0, chunks=1)
    result = evaluator.compute()[0]
    assert result.metrics == {"image_auroc": None, "pixel_auroc": None}
    assert any("no anomalous" in note for note in result.notes)


def test_gaussian_kernel_weights():
    k = gaussian_kernel(5, 4.0)
    assert torch.isclose(k.sum(), torch.tensor(1.0))
    one_d = k[0, 0].sum(0)
    torch.testing.assert_close(one_d, torch.tensor([0.18763, 0.20607, 0.21261, 0.20607, 0.18763]), atol=1e-5, rtol=0)


def test_top_percent_score():
    maps = torch.arange(10000, dtype=torch.float32).reshape(1, 1, 100, 100)
    assert top_percent_score(maps, 0.01).item() == sum(range(9900, 10000)) / 100
