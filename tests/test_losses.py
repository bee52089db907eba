"""Loss terms: ESB by hand, hard-mining gradients, CLUB/EIR behaviour and pair selection."""

from __future__ import annotations

import random

import pytest
import torch

from src.losses import CLUBEstimator, LossWeights, esb_loss, hard_mining_k, patch_loss, select_eir_pairs
from src.models.outputs import GlobalRun, PatchRun


def test_esb_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    parts = esb_loss(logits, mask, capacity_factor=1.0)
    p = torch.softmax(logits.detach(), 1).mean(0)
    assert torch.isclose(parts["importance"], 3 * (p**2).sum())
    # counts (2, 1, 1), capacity 1 * 2 / 3: relu(2 - 2/3)^2 + 2 * relu(1 - 2/3)^2
    assert torch.isclose(parts["load"], torch.tensor((4 / 3) ** 2 + 2 * (1 / 3) ** 2))
    assert torch.isclose(parts["z"], logits.detach().pow(2).mean())
    assert not parts["load"].requires_grad, "the load term carries no gradient (SPEC B7)"
    assert parts["importance"].requires_grad and parts["z"].requires_grad


def _patch_setup():
    torch.manual_seed(0)
    en = torch.randn(2, 4, 5, 5)
    de = torch.randn(2, 4, 5, 5, requires_grad=True)
    run = PatchRun(torch.arange(2), [de], de.mean((2, 3)))
    routing = torch.tensor([[0.7, 0.3], [1.0, 0.0]])
    return en, de, run, routing


@pytest.mark.parametrize(("rule", "k"), [("original", 4), ("per_group", 5)])
def test_hard_mining_scales_gradients_of_easy_points_only(rule, k):
    en, de, run, routing = _patch_setup()
    plain = LossWeights(hard_mining_ratio=1.0, hard_mining_factor=1.0, hard_mining=rule)
    loss = patch_loss([en], [run, None], routing, plain)
    (grad_plain,) = torch.autograd.grad(loss, de)

    en, de, run, routing = _patch_setup()
    mined = LossWeights(hard_mining_ratio=0.1, hard_mining_factor=0.1, hard_mining=rule)
    loss_mined = patch_loss([en], [run, None], routing, mined)
    assert torch.isclose(loss, loss_mined), "hard mining changes gradients, not the value"
    loss_mined.backward()
    distance = 1 - torch.cosine_similarity(en, de.detach(), dim=1)
    # 50 points: the original keeps int(50 * (1 - 0.9)) = int(4.999...) = 4, per_group int(0.1 * 50) = 5
    assert hard_mining_k(50, mined) == k
    hard = distance >= distance.flatten().topk(k).values[-1]
    assert hard.sum() == k
    ratio = de.grad / grad_plain
    torch.testing.assert_close(ratio[hard.unsqueeze(1).expand_as(ratio)], torch.ones(k * 4))
    torch.testing.assert_close(ratio[~hard.unsqueeze(1).expand_as(ratio)], torch.full(((50 - k) * 4,), 0.1))


def test_original_hard_mining_k_matches_the_floating_point_rule():
    original, fixed = LossWeights(), LossWeights(hard_mining="per_group")
    assert original.hard_mining == "original"  # the default: a reproduction trains as the original did
    # The original's k for its training maps (B * 28 * 28 points) and for the fixture's 80 points.
    for n in (80, 8 * 28 * 28, 6272, 37):
        assert hard_mining_k(n, original) == int(n * (1 - 0.9))
    assert hard_mining_k(80, original) == 7 and hard_mining_k(80, fixed) == 8
    with pytest.raises(ValueError, match="module.loss.hard_mining='late'"):
        LossWeights(hard_mining="late")


def test_original_hard_mining_scales_every_group_with_the_last_groups_mask():
    torch.manual_seed(0)
    en = [torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)]

    def grads(rule: str) -> list[torch.Tensor]:
        de = [torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(g)).requires_grad_() for g in (1, 2)]
        run = PatchRun(torch.arange(2), de, de[1].mean((2, 3)))
        weights = LossWeights(hard_mining_ratio=0.1, hard_mining_factor=0.1, hard_mining=rule)
        patch_loss(en, [run], torch.ones(2, 1), weights).backward()
        de_plain = [d.detach().clone().requires_grad_() for d in de]
        run = PatchRun(torch.arange(2), de_plain, de_plain[1].mean((2, 3)))
        patch_loss(en, [run], torch.ones(2, 1), LossWeights(hard_mining_ratio=1.0, hard_mining_factor=1.0)).backward()
        plain = [d.grad for d in de_plain]
        return [(d.grad / p)[:, 0] for d, p in zip(de, plain)]  # (2, 5, 5) gradient factors per group

    def easy(g: int, k: int) -> torch.Tensor:
        de = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(g + 1))
        distance = 1 - torch.cosine_similarity(en[g], de, dim=1)
        return distance < distance.flatten().topk(k).values[-1]

    first, last = grads("original")
    expected_last = torch.where(easy(1, 4), 0.1, 1.0)
    torch.testing.assert_close(last, expected_last)
    torch.testing.assert_close(first, expected_last)  # the first group with the last group's mask
    first, last = grads("per_group")
    torch.testing.assert_close(first, torch.where(easy(0, 5), 0.1, 1.0))
    torch.testing.assert_close(last, torch.where(easy(1, 5), 0.1, 1.0))
    assert not torch.equal(easy(0, 4), easy(1, 4)), "the two groups' masks differ, so the test can tell them apart"


def test_patch_loss_value_by_hand():
    en, de, run, routing = _patch_setup()
    loss = patch_loss([en], [run, None], routing, LossWeights())
    per_image = (1 - torch.cosine_similarity(en, de.detach(), dim=1)).mean((1, 2))
    assert torch.isclose(loss, (routing[:, 0] * per_image).sum() / 2)


def test_eir_bound_leaves_estimator_without_gradient():
    torch.manual_seed(0)
    est = CLUBEstimator(8)
    x = torch.randn(6, 8, requires_grad=True)
    y = torch.randn(6, 8, requires_grad=True)
    bound = est.upper_bound("patch", x, y)
    bound.backward()
    assert x.grad is not None and y.grad is not None
    assert all(p.grad is None for p in est.parameters())
    est.log_likelihood("patch", x.detach(), y.detach()).backward()
    assert all(p.grad is not None for n, p in est.named_parameters() if not n.startswith("nets.global"))


def test_full_likelihood_switch_adds_the_log_variance_term():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    plain, full = CLUBEstimator(8), CLUBEstimator(8, full_likelihood=True)
    full.load_state_dict(plain.state_dict())
    _, _, _, logvar = plain._heads("global", x, y, frozen=False)
    expected = plain.log_likelihood("global", x, y) - logvar.sum(-1).mean() / 2
    torch.testing.assert_close(full.log_likelihood("global", x, y), expected)


def _run(rows, features):
    return GlobalRun(torch.tensor(rows), None, None, features)


def test_pairs_dense_use_one_random_pair_for_all_images():
    f = [torch.full((4, 2), float(e)) for e in range(3)]
    runs = [_run([0, 1, 2, 3], f[e]) for e in range(3)]
    x, y = select_eir_pairs(runs, 4, random.Random(0))
    assert x.shape == (4, 2) and len(set(x[:, 0].tolist())) == 1 and x[0, 0] != y[0, 0]


def test_pairs_sparse_pick_two_experts_that_ran_on_each_image():
    # expert 0 ran on images 0, 1; expert 1 on 1, 2; expert 2 on 0, 1, 2. Image 3 had none.
    feats = {0: [0, 1], 1: [1, 2], 2: [0, 1, 2]}
    runs = [_run(r, torch.tensor([[10.0 * e + b] for b in r])) for e, r in feats.items()]
    x, y = select_eir_pairs(runs, 4, random.Random(0))
    assert x.shape == (3, 1)
    for xv, yv in zip(x.flatten().tolist(), y.flatten().tolist()):
        ex, bx, ey, by = int(xv // 10), int(xv % 10), int(yv // 10), int(yv % 10)
        assert bx == by, "pairs come from the same image"
        assert ex != ey and bx in feats[ex] and by in feats[ey]


def test_pairs_need_two_images():
    runs = [_run([0], torch.ones(1, 2)), _run([0], torch.zeros(1, 2)), None]
    assert select_eir_pairs(runs, 3, random.Random(0)) is None
