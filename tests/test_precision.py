"""trainer.precision=bf16-mixed: five training steps against fp32, and what stays in float32."""

from __future__ import annotations

import json
import math

import pytest
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


@pytest.mark.slow
def test_bf16_mixed_train_test_and_predict_from_the_command_line(small_demo_root, tmp_path):
    """What a user runs: train under trainer.precision=bf16-mixed, then mode=test and mode=predict
    from its last.ckpt; the scores are finite and the run says it trained in bf16."""
    from tests.conftest import small_demo_overrides
    from tests.test_run import run_cli

    common = [*small_demo_overrides(small_demo_root), "dataset.batch_size=4", "trainer.max_steps=2",
              "trainer.log_every_n_steps=1", "trainer.precision=bf16-mixed"]
    train_dir = tmp_path / "train"
    proc = run_cli(*common, f"paths.output_dir={train_dir}")
    assert "Using bfloat16 Automatic Mixed Precision" in proc.stdout + proc.stderr
    assert "precision: bf16-mixed" in (train_dir / "config.yaml").read_text()
    report = json.loads((train_dir / "results.json").read_text())
    assert report["checkpoint"]["global_step"] == 2
    assert all(math.isfinite(v) for v in report["mean"].values() if v is not None)
    losses = [row.split(",") for row in (train_dir / "csv" / "metrics.csv").read_text().splitlines()]
    loss_column = losses[0].index("train/loss")
    assert all(math.isfinite(float(row[loss_column])) for row in losses[1:] if row[loss_column])

    ckpt = train_dir / "checkpoints" / "last.ckpt"
    test_dir = tmp_path / "test"
    proc = run_cli(*common, "mode=test", f"ckpt_path={ckpt}", f"paths.output_dir={test_dir}")
    assert "Using bfloat16 Automatic Mixed Precision" in proc.stdout + proc.stderr
    tested = json.loads((test_dir / "results.json").read_text())
    assert set(tested["classes"]) == {"demo/fabric", "demo/widget"}
    assert all(math.isfinite(v) for v in tested["mean"].values() if v is not None)

    predict_dir = tmp_path / "predict"
    run_cli(*common, "mode=predict", f"ckpt_path={ckpt}", f"predict.input={small_demo_root / 'widget' / 'test'}",
            "predict.recursive=true", f"paths.output_dir={predict_dir}")
    predictions = json.loads((predict_dir / "predictions" / "predictions.json").read_text())
    assert predictions["num_scored"] == len(predictions["images"]) > 0
    assert all(math.isfinite(entry["score"]) for entry in predictions["images"])
