"""trainer.precision=bf16-mixed: five training steps against fp32, and what stays in float32."""

from __future__ import annotations

import torch

from src.losses import CLUBEstimator
from tests.test_device_placement import _batch, _module, without_trainer

BF16_EPS = 2.0**-8  # bf16 keeps 8 bits of mantissa: relative rounding error of one operation


def _five_steps(bf16: bool) -> list[dict[str, float]]:
    """The module's own training step, five times, without a Trainer (as tests/test_device_placement.py)."""
    module = _module()
    logged: dict = {}
    without_trainer(module, logged)
    module.step_rng = {"cpu": torch.Generator().manual_seed(0).get_state()}
    steps = []
    for step in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            module.training_step(_batch(counts=(2, 0, 1, 3)), step)
        steps.append({k.removeprefix("train/"): float(v) for k, v in logged.items()})
    return steps


def test_five_bf16_steps_follow_fp32():
    """Measured: the loss within 1.5e-3 relative (2 eps allowed), ESB equal, the estimator's loss within 1.7e-3."""
    fp32, bf16 = _five_steps(False), _five_steps(True)
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        for term in ("loss", "estimator", "esb"):
            assert abs(a[term] - b[term]) <= 2 * BF16_EPS * abs(a[term]) + 1e-6, (step, term, a[term], b[term])


def test_club_terms_stay_in_float32_under_autocast():
    """The EIR bound is a small difference of two large sums; in bf16 it moved by 2.3x its value
    after one step (-0.0048 against -0.0156), in float32 by 0.15x (the features' own rounding)."""
    torch.manual_seed(0)
    estimator = CLUBEstimator(16)
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    perm = torch.randperm(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = estimator.upper_bound("patch", x, y, perm=perm)
        _, _, mu, logvar = estimator._heads("patch", x.bfloat16(), y.bfloat16(), frozen=True)
    assert mu.dtype == logvar.dtype == torch.float32
    torch.testing.assert_close(got, estimator.upper_bound("patch", x, y, perm=perm))  # fp32's value
