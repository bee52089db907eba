"""mode=predict on a folder and on one image; unreadable files; where the threshold comes from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.entry import run_task
from src.evaluation.calibration import Calibration
from tests.conftest import compose_cfg, small_demo_overrides


def with_calibration(source: Path, target: Path, calibration: Calibration) -> Path:
    """A copy of checkpoint ``source`` holding ``calibration`` (as mode=train stores it)."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["calibration"] = calibration.to_dict()
    torch.save(checkpoint, target)
    return target


def predict(root: Path, ckpt: Path, input_path: Path, out: Path, *extra: str) -> dict:
    cfg = compose_cfg([*small_demo_overrides(root), "mode=predict", f"ckpt_path={ckpt}", f"predict.input={input_path}",
                       f"paths.output_dir={out}", *extra])
    run_task(cfg)
    return json.loads((out / "predictions" / "predictions.json").read_text())


@pytest.fixture(scope="module")
def ten_images(small_demo_root, tmp_path_factory) -> Path:
    """10 demo test images (both classes, normal and defective), a broken image and a text file."""
    folder = tmp_path_factory.mktemp("inputs")
    sources = sorted((small_demo_root / "widget" / "test").rglob("*.png"))[:6]
    sources += sorted((small_demo_root / "fabric" / "test").rglob("*.png"))[:4]
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"{i:02d}_{src.parent.name}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "readme.txt").write_text("not an image")
    return folder


@pytest.mark.slow
def test_predict_folder_single_image_and_stored_calibration(small_demo_root, demo_checkpoint, ten_images, tmp_path):
    # 1. The checkpoint holds no calibration: it is computed from the dataset's normal images.
    result = predict(small_demo_root, demo_checkpoint, ten_images, tmp_path / "folder")
    assert result["num_images"] == 11 and result["num_scored"] == 10 and result["num_errors"] == 1
    assert result["images_per_s"] > 0
    assert result["errors"][0]["path"].endswith("broken.png") and "cannot read image" in result["errors"][0]["error"]
    assert [Path(s["path"]).name for s in result["skipped"]] == ["readme.txt"]
    # The model has component experts but the checkpoint no part prototypes (true masks): images are
    # scored without masks, against the statistics of normal images scored without masks, pooled.
    assert result["statistics"]["source"].startswith("computed") and result["class_key"] == "all"
    assert any("no part prototypes" in note for note in result["notes"])
    stats = result["statistics"]["classes"]["all (without masks)"]
    assert stats["num_images"] == 16
    calibration = Calibration.load(tmp_path / "folder" / "predictions" / "calibration.json")
    assert calibration.unmasked["all"].threshold == stats["threshold"] != calibration.stats["all"].threshold
    assert "largest image score" in result["decision_rule"]
    for entry in result["images"]:
        assert entry["anomalous"] == (entry["score"] >= stats["threshold"])
        heatmap = tmp_path / "folder" / "predictions" / entry["heatmap"]
        assert Image.open(heatmap).size == (3 * 256, 256)  # image | heat map | predicted mask
    assert result["num_anomalous"] == sum(e["anomalous"] for e in result["images"])

    # 2. One image, with a calibration stored in the checkpoint and a per-class threshold.
    calibration.unmasked["demo/widget"].threshold = 0.0  # every score is >= 0: decides "anomalous"
    ckpt = with_calibration(demo_checkpoint, tmp_path / "calibrated.ckpt", calibration)
    image = sorted(ten_images.glob("*.png"))[0]
    single = predict(small_demo_root, ckpt, image, tmp_path / "single", "predict.class_key=demo/widget")
    assert single["num_scored"] == 1 and single["statistics"]["source"] == "checkpoint"
    assert single["images"][0]["anomalous"] is True
    # The same image scores the same alone as within the folder (inductive protocol, same statistics).
    in_folder = next(e for e in result["images"] if e["path"] == str(image))
    alone = predict(small_demo_root, ckpt, image, tmp_path / "alone")["images"][0]
    assert alone["score"] == pytest.approx(in_folder["score"], abs=1e-6)


def test_predict_errors_name_the_setting(small_demo_root, demo_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="predict.input="):
        predict(small_demo_root, demo_checkpoint, tmp_path / "absent", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(Exception, match="holds no images"):
        predict(small_demo_root, demo_checkpoint, empty, tmp_path / "out")  # a run that failed leaves no results


def test_calibration_travels_in_the_checkpoint(demo_checkpoint, tmp_path, small_demo_root):
    from hydra.utils import instantiate

    from src.checkpoints import load_weights, read_checkpoint
    from src.evaluation.calibration import NormalStatistics

    calibration = Calibration(1.0, {"all": NormalStatistics([0, 0, 0], [1, 1, 1], 0.5, 3, 0.2, 0.5)})
    ckpt = with_calibration(demo_checkpoint, tmp_path / "c.ckpt", calibration)
    cfg = compose_cfg(small_demo_overrides(small_demo_root))
    module = instantiate(cfg.module, net=instantiate(cfg.model))
    load_weights(module, read_checkpoint(ckpt))
    assert module.calibration == calibration and module.calibration_source == "checkpoint"
    saved = {}
    module.on_save_checkpoint(saved)
    assert Calibration.from_dict(saved["calibration"]) == calibration
    load_weights(module, read_checkpoint(ckpt), calibration=False)  # evaluation.recalibrate=true
    assert module.calibration is None


def test_a_stopped_prediction_keeps_its_results_and_continues(small_demo_root, demo_checkpoint, ten_images, tmp_path,
                                                              monkeypatch):
    """Stop mode=predict while it writes its third heat map (as a kill would): the images scored
    so far are on disk, no heat map is cut short, the folder says it is unfinished; running the
    command again scores only the rest and gives the results of an uninterrupted run."""
    from src.errors import ConfigError
    from src.prediction_writer import PARTIAL

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image in sorted(ten_images.glob("*.png"))[:4] + [ten_images / "broken.png"]:
        shutil.copy(image, inputs / image.name)
    extra = ("predict.batch_size=2", "evaluation.calibration.images_per_class=2")
    reference = predict(small_demo_root, demo_checkpoint, inputs, tmp_path / "whole", *extra)

    saved, original_save = [], Image.Image.save

    def killed_on_the_third(self, fp, *args, **kwargs):
        if len(saved) == 2:
            Path(fp).write_bytes(b"\x89PNG cut short")
            raise KeyboardInterrupt
        saved.append(fp)
        return original_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", killed_on_the_third)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        predict(small_demo_root, demo_checkpoint, inputs, out, *extra)
    monkeypatch.undo()
    folder = out / "predictions"
    rows = (folder / PARTIAL).read_text().splitlines()
    assert len(rows) == 1 + 2 and not (folder / "predictions.json").exists()  # header and the first batch
    assert sorted(p.name for p in (folder / "heatmaps").iterdir()) == sorted(Path(p).name for p in [
        r["heatmap"] for r in reference["images"][:2]])  # no partial file left behind

    with pytest.raises(ConfigError, match="unfinished prediction of other settings.*class_key"):
        predict(small_demo_root, demo_checkpoint, inputs, out, *extra, "predict.class_key=demo/widget")
    resumed = predict(small_demo_root, demo_checkpoint, inputs, out, *extra)
    assert not (folder / PARTIAL).exists()
    assert [(r["path"], r["heatmap"]) for r in resumed["images"]] == [(r["path"], r["heatmap"]) for r in reference["images"]]
    assert [r["score"] for r in resumed["images"]] == pytest.approx([r["score"] for r in reference["images"]], abs=1e-6)
    assert resumed["num_errors"] == 1 and resumed["num_scored"] == 4
    for entry in resumed["images"]:
        Image.open(folder / entry["heatmap"]).load()
