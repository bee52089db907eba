"""The model you test is the model you run: a new image takes the path a test image takes.

A demo model trained on component masks computed by the run itself (``segment.on_first_use``)
carries its classes' part prototypes. ``mode=predict`` on the test folders, with no masks and no
class key, must give every image the score and decision that the inductive test wrote to
``scores.csv``: it chooses the class, segments the image like ``mode=segment`` did, and scores it
with that class's statistics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.components import read_component_masks
from src.entry import run_task
from src.errors import ConfigError
from src.segment.online import PartSegmentation
from tests.conftest import compose_cfg, small_demo_overrides


def overrides(root: Path, masks: Path) -> list[str]:
    return [o for o in small_demo_overrides(root) if not o.startswith("dataset.component_masks=")] + [
        f"dataset.component_masks={masks}", "evaluation.protocol=inductive"]


def read_csv(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {Path(row["path"]).resolve().as_posix(): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def trained(small_demo_root, tmp_path_factory) -> dict:
    """A few training steps of the small demo on masks segmented on first use, then the inductive test."""
    tmp = tmp_path_factory.mktemp("path")
    masks, run = tmp / "components", tmp / "run"
    cfg = compose_cfg([*overrides(small_demo_root, masks), "experiment=demo", "trainer.max_steps=6", "seed=0",
                       f"paths.output_dir={run}", "logger=none"])
    run_task(cfg)
    return {"root": small_demo_root, "masks": masks, "run": run, "ckpt": run / "checkpoints" / "last.ckpt", "tmp": tmp}


def predict(trained: dict, folder: Path, out: Path, *extra: str) -> dict:
    cfg = compose_cfg([*overrides(trained["root"], trained["masks"]), "mode=predict", f"ckpt_path={trained['ckpt']}",
                       f"predict.input={folder}", "predict.recursive=true", f"paths.output_dir={out}", *extra])
    run_task(cfg)
    return json.loads((out / "predictions" / "predictions.json").read_text())


@pytest.mark.slow
def test_masks_are_computed_on_first_use_and_travel_in_the_checkpoint(trained):
    assert (trained["masks"] / "widget" / "manifest.json").is_file()  # segmented before training
    assert any((trained["masks"] / "widget" / "test").rglob("*.npz"))
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    parts = PartSegmentation.from_dict(checkpoint["segmentation"])
    assert set(parts.classes) == {"demo/fabric", "demo/widget"} and parts.route == "cluster"
    assert parts.params["features"]["kind"] == "backbone"
    unmasked = checkpoint["calibration"]["unmasked"]
    assert set(unmasked) == set(checkpoint["calibration"]["stats"])  # the statistics of images without masks
    rows = read_csv(trained["run"] / "scores.csv")
    assert set(rows) == {p.resolve().as_posix() for p in trained["root"].glob("*/test/*/*.png")}
    assert {r["class"] for r in rows.values()} == {"demo/fabric", "demo/widget"}
    assert {r["anomalous"] for r in rows.values()} <= {"True", "False"} and all(r["experts"] for r in rows.values())


@pytest.mark.slow
def test_predict_gives_every_test_image_its_test_score_and_decision(trained):
    tested = read_csv(trained["run"] / "scores.csv")
    predicted = {}
    for name in ("widget", "fabric"):
        result = predict(trained, trained["root"] / name / "test", trained["tmp"] / f"predict_{name}")
        assert result["class_key"] == "chosen per image" and result["num_errors"] == 0
        assert all(i["component_masks"] == "computed" for i in result["images"])
        predicted.update(read_csv(trained["tmp"] / f"predict_{name}" / "predictions" / "predictions.csv"))
    assert set(predicted) == set(tested)
    for path, row in predicted.items():
        test = tested[path]
        assert row["class"] == test["class"], path  # the class chosen is the image's class
        assert abs(float(row["score"]) - float(test["score"])) <= 1e-5 * max(1.0, abs(float(test["score"]))), path
        assert row["anomalous"] == test["anomalous"], path
        assert row["experts"] == test["experts"], path
    normal = [p for p, r in tested.items() if r["label"] == "0"]
    assert sum(predicted[p]["anomalous"] == "True" for p in normal) == sum(tested[p]["anomalous"] == "True" for p in normal)


@pytest.mark.slow
def test_images_that_cannot_be_segmented_are_scored_without_masks_and_unmasked_statistics(trained, tmp_path):
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    del checkpoint["segmentation"]  # e.g. a model trained on masks that mode=segment did not compute
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)
    folder = trained["root"] / "widget" / "test"
    result = predict({**trained, "ckpt": bare}, folder, tmp_path / "out", "predict.class_key=demo/widget")
    assert all(i["component_masks"] == "none" for i in result["images"])
    assert any("no part prototypes" in n for n in result["notes"])
    stats = result["statistics"]["classes"]["demo/widget (without masks)"]
    assert stats == checkpoint["calibration"]["unmasked"]["demo/widget"]
    for entry in result["images"]:
        assert entry["anomalous"] == (entry["score"] >= stats["threshold"])
        assert not any(name.startswith("component") for name in entry["experts"])


@pytest.mark.slow
def test_group_maps_are_written_on_request(trained, tmp_path):
    image = sorted((trained["root"] / "widget" / "test" / "good").glob("*.png"))[0]
    result = predict(trained, image, tmp_path / "out", "predict.save_group_maps=true")
    maps = np.load(tmp_path / "out" / "predictions" / result["images"][0]["group_maps"])
    assert sorted(maps.files) == ["component", "global", "patch"] and maps["patch"].shape == (84, 84)
    assert float(maps["component"].max()) > 0  # the component experts saw the computed masks


@pytest.mark.slow
def test_a_test_image_without_cached_masks_is_segmented_with_the_checkpoints_prototypes(trained, tmp_path):
    cached = sorted((trained["masks"] / "widget" / "test").rglob("*.npz"))[0]
    before = cached.read_bytes()
    cached.unlink()  # e.g. an image added to the test set after training
    cfg = compose_cfg([*overrides(trained["root"], trained["masks"]), "experiment=demo", "mode=test",
                       f"ckpt_path={trained['ckpt']}", f"paths.output_dir={tmp_path / 'test'}", "logger=none"])
    run_task(cfg)
    restored = tmp_path / "before.npz"
    restored.write_bytes(before)
    assert np.array_equal(read_component_masks(cached), read_component_masks(restored))  # what mode=segment wrote
    tested, again = read_csv(trained["run"] / "scores.csv"), read_csv(tmp_path / "test" / "scores.csv")
    assert set(again) == set(tested)
    for path, row in again.items():
        assert abs(float(row["score"]) - float(tested[path]["score"])) <= 1e-5 * max(1.0, abs(float(row["score"])))


@pytest.mark.slow
def test_a_class_key_without_part_prototypes_is_refused(trained, tmp_path):
    image = sorted((trained["root"] / "widget" / "test" / "good").glob("*.png"))[0]
    with pytest.raises(ConfigError, match=r"predict.class_key='all'.*demo/fabric"):
        predict(trained, image, tmp_path / "out", "predict.class_key=all")


@pytest.mark.slow
def test_segment_on_first_use_brings_a_stale_cache_up_to_date(trained, tmp_path):
    """A cache that lost a file (or whose images changed) is brought up to date before training,
    not reported as missing masks; folders of masks from elsewhere are never written to."""
    cached = sorted((trained["masks"] / "widget" / "train" / "good").glob("*.npz"))[0]
    cached.unlink()
    true_masks = trained["root"] / "components_true"
    before = sorted(p.name for p in true_masks.rglob("*"))
    cfg = compose_cfg([*overrides(trained["root"], trained["masks"]), "experiment=demo", "trainer.max_steps=1",
                       "seed=0", "test_after_training=false", f"paths.output_dir={tmp_path / 'again'}", "logger=none"])
    run_task(cfg)
    assert read_component_masks(cached).shape[0] == 3  # recomputed: the widget keeps 3 part slots
    assert sorted(p.name for p in true_masks.rglob("*")) == before


@pytest.mark.slow
def test_training_on_the_true_masks_segments_nothing(small_demo_root, tmp_path):
    """With dataset.component_masks at the demo's true masks, training reads those: nothing is
    segmented into the folder mode=segment would write (the data folder)."""
    data = tmp_path / "data"
    cfg = compose_cfg([*small_demo_overrides(small_demo_root), "trainer.max_steps=1", "test_after_training=false",
                       f"paths.data_dir={data}", f"paths.output_dir={tmp_path / 'run'}", "logger=none"])
    assert cfg.segment.on_first_use
    run_task(cfg)
    assert not (data / "components").exists()
