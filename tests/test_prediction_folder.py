"""A finished prediction is never deleted or rewritten, and a resumed one never mixes two models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.errors import ConfigError
from src.modes.predict import open_writer
from src.prediction_writer import PARTIAL
from src.entry import run_task
from tests.conftest import compose_cfg, small_demo_overrides
from tests.test_predict import predict, ten_images  # noqa: F401  (module-scoped inputs)


@pytest.fixture
def inputs(ten_images, tmp_path) -> Path:  # noqa: F811
    folder = tmp_path / "inputs"
    folder.mkdir()
    for image in sorted(ten_images.glob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
    return folder


def predict_into(root: Path, ckpt: Path, input_path: Path, run: Path, folder: Path) -> None:
    run_task(compose_cfg([*small_demo_overrides(root), "mode=predict", f"ckpt_path={ckpt}", f"predict.input={input_path}",
                          f"paths.output_dir={run}", f"predict.output_dir={folder}",
                          "evaluation.calibration.images_per_class=2"]))


def test_a_finished_prediction_is_never_rewritten(small_demo_root, demo_checkpoint, inputs, tmp_path):
    kept = tmp_path / "kept"
    predict_into(small_demo_root, demo_checkpoint, inputs, tmp_path / "first", kept)
    before = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    assert (kept / "predictions.json").is_file() and any(kept.glob("heatmaps/*.png"))
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next(inputs.iterdir()), one / "only.png")
    with pytest.raises(ConfigError, match=f"predict.output_dir={kept} holds a finished prediction .*predictions.json"):
        predict_into(small_demo_root, demo_checkpoint, one, tmp_path / "second", kept)
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before


def test_a_resume_with_other_weights_at_the_same_path_is_refused(small_demo_root, demo_checkpoint, inputs, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(demo_checkpoint, ckpt)
    out = tmp_path / "run" / "predictions"
    settings = OmegaConf.create({"class_key": None})
    open_writer(out, inputs, ckpt, settings).close()  # a prediction stopped before its first image
    header = json.loads((out / PARTIAL).read_text().splitlines()[0])["prediction"]
    assert len(header["checkpoint_sha256"]) == 64
    state = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][name] = state["state_dict"][name] + 1
    torch.save(state, ckpt)  # other weights, same path
    with pytest.raises(ConfigError, match="unfinished prediction of other settings .*checkpoint_sha256.*content differs"):
        predict(small_demo_root, ckpt, inputs, tmp_path / "run", "evaluation.calibration.images_per_class=2")
    assert (out / PARTIAL).read_text().splitlines()[0] == json.dumps({"prediction": header})
