"""The exported model scores like the checkpoint, and its runtime needs no training stack.

Fast tests check the pieces the graph and the runtime replace (3x3 inverses, batched refinement,
index maps of the nearest resizes); the slow one exports the small demo model trained in
``tests/test_predict_path.py`` and predicts with the file.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.dataset import AnomalyTransforms
from src.inference import mask_index, nearest_index
from src.models.experts import legacy_nearest_index
from src.modes.export import parity
from src.segment.refine import RefineSettings, inverse_3x3, refine
from src.segment.runner import resize_masks
from tests.conftest import ROOT, compose_cfg
from tests.test_predict_path import overrides, trained  # noqa: F401  (the trained demo model, module-scoped)


def test_cofactor_inverse_and_batched_refinement_match_the_segmentation(seeded):
    images = torch.rand(2, 3, 40, 40)
    logits = 5 * torch.randn(2, 4, 40, 40)
    one_by_one = torch.stack([refine(logits[i], images[i], RefineSettings()) for i in range(2)])
    assert torch.equal(refine(logits, images, RefineSettings()), one_by_one)
    exported = refine(logits, images, RefineSettings(), inverse_3x3)
    torch.testing.assert_close(exported, one_by_one, atol=1e-5, rtol=0)
    matrices = torch.rand(50, 3, 3) @ torch.rand(50, 3, 3).mT + 1e-3 * torch.eye(3)
    torch.testing.assert_close(inverse_3x3(matrices), torch.linalg.inv(matrices), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("size", [84, 96, 112, 392, 448, 1024])
def test_index_maps_equal_torchs_nearest_resizes(size):
    for out in (6, 8, 28, 32):
        ref = F.interpolate(torch.arange(size, dtype=torch.float32)[None, None, None], size=(1, out), mode="nearest")
        assert torch.equal(legacy_nearest_index(size, out), ref[0, 0, 0].long())
    for out in (84, 96, 100, 448, 900):
        ref = F.interpolate(torch.arange(size, dtype=torch.float32)[None, None, None], size=(1, out), mode="nearest-exact")
        assert np.array_equal(nearest_index(size, out), ref[0, 0, 0].long().numpy())


@pytest.mark.parametrize("height,width", [(96, 96), (120, 90), (333, 517)])
def test_mask_index_carries_masks_like_predict(height, width):
    """Masks at the segmentation size -> the image's size -> the model's input, as mode=predict."""
    segment_size, transforms = 84, AnomalyTransforms(resize=96, crop=84)
    labels = torch.randint(0, 5, (segment_size, segment_size))
    masks = labels[None] == torch.arange(5)[:, None, None]  # (5, s, s)
    expected = transforms.masks(resize_masks(masks, (height, width))).bool()
    rows = mask_index(height, segment_size, 96, 84)
    cols = mask_index(width, segment_size, 96, 84)
    assert torch.equal(masks[:, rows][:, :, cols], expected)


def test_the_check_fails_on_a_score_a_class_or_a_nan():
    def record(score, key="a/x", anomalous=False):
        from src.evaluation.calibration import NormalStatistics

        return {"path": "p.png", "class": key, "score": score, "anomalous": anomalous, "map": np.zeros((2, 2)),
                "statistics": NormalStatistics([0] * 3, [1] * 3, 0.5, 1, 0.4, 0.5)}

    assert parity([record(0.3)], [record(0.3 + 1e-7)], [0.5], 1e-3)["passed"]
    assert not parity([record(0.3)], [record(0.31)], [0.5], 1e-3)["passed"]
    assert not parity([record(0.3)], [record(float("nan"))], [0.5], 1e-3)["passed"]
    assert not parity([record(0.3)], [record(0.3, "a/y")], [0.5], 1e-3)["passed"]
    assert parity([record(0.5, anomalous=True)], [record(0.5 - 1e-7)], [0.5], 1e-3)["passed"]  # at the threshold


def test_the_runtime_imports_no_training_stack():
    code = ("import sys; import src.inference; heavy = {'torch', 'lightning', 'hydra', 'timm', 'omegaconf'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(heavy)); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_exported_model_predicts_like_the_checkpoint(trained, tmp_path):  # noqa: F811
    from src.entry import run_task

    base = overrides(trained["root"], trained["masks"])
    run_task(compose_cfg([*base, "mode=export", "export.format=onnx", f"ckpt_path={trained['ckpt']}",
                          f"paths.output_dir={tmp_path / 'export'}"]))
    model = tmp_path / "export" / "export" / "model.onnx"
    info = json.loads(model.with_suffix(".json").read_text())
    assert info["parity"]["passed"] and info["parity"]["images"] == 8 and info["parity"]["classes_equal"] == 8
    assert info["class_keys"] == ["demo/fabric", "demo/widget"] and info["preprocessing"]["segment_size"]
    folder = trained["root"] / "widget" / "test"
    predicted = {}
    for name, ckpt, extra in (("ckpt", trained["ckpt"], base), ("onnx", model, [])):
        run_task(compose_cfg([*extra, "mode=predict", f"ckpt_path={ckpt}", f"predict.input={folder}",
                              "predict.recursive=true", f"paths.output_dir={tmp_path / name}"]))
        with (tmp_path / name / "predictions" / "predictions.csv").open() as f:
            predicted[name] = {row["path"]: row for row in csv.DictReader(f)}
    assert set(predicted["ckpt"]) == set(predicted["onnx"])
    tolerance = info["parity"]["tolerance"]
    for path, row in predicted["ckpt"].items():
        other = predicted["onnx"][path]
        assert abs(float(row["score"]) - float(other["score"])) <= tolerance, path
        assert (row["class"], row["anomalous"], row["experts"]) == (other["class"], other["anomalous"], other["experts"])
    assert json.loads((tmp_path / "onnx" / "predictions" / "predictions.json").read_text())["checkpoint_format"] == "onnx"
