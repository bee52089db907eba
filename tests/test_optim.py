"""StableAdamW against the update rule written out, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.optim import StableAdamW, warm_cosine_factor, warm_cosine_schedule


def reference_steps(theta, grads, lr, betas, eps, wd, clip):
    """SPEC 7.8, step by step in float64 numpy."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    vmax = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta = theta * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        vmax = np.maximum(vmax, v)
        den = np.sqrt(vmax) / math.sqrt(1 - betas[1] ** t) + eps
        rms = np.sqrt(np.mean((g / den) ** 2))
        s = max(1.0, rms / clip)
        theta = theta - lr / (1 - betas[0] ** t) / s * m / den
    return theta


@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_stable_adamw_matches_the_rule(clip):
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) * s for s in (1.0, 0.1, 3.0, 0.01)]  # shrinking grads exercise AMSGrad
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    idle = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = StableAdamW([p, idle], lr=1e-2, betas=(0.9, 0.999), eps=1e-10, weight_decay=0.1, clip_threshold=clip)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    expected = reference_steps(theta0, grads, 1e-2, (0.9, 0.999), 1e-10, 0.1, clip)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(idle.detach(), torch.ones(2, dtype=torch.float64)), "no grad: no update, no decay"


def test_schedule_matches_the_original():
    base, final = 5e-4, 5e-6
    warm = np.linspace(0, base, 100)
    for step in (0, 1, 50, 99):
        assert warm_cosine_factor(step, 100, 1000, final / base) * base == pytest.approx(warm[step])
    assert warm_cosine_factor(100, 100, 1000, final / base) == pytest.approx(1.0)  # peak twice (SPEC B10)
    mid = 100 + 450
    expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * 450 / 900))
    assert warm_cosine_factor(mid, 100, 1000, final / base) * base == pytest.approx(expected)
    assert warm_cosine_factor(5000, 100, 1000, final / base) * base == pytest.approx(final)


def test_schedule_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = StableAdamW([p], lr=1.0)
    sched = warm_cosine_schedule(opt, total_steps=10, warmup_steps=3, final_lr=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.1)
