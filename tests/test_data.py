"""Datasets on disk: MVTec layout, bad input, component masks, the demo generator."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.components import component_path, read_component_masks, save_component_masks
from data_modules.datamodule import AnomalyDataModule
from data_modules.dataset import AnomalyTransforms, collate_samples
from data_modules.io import open_image
from data_modules.sources.demo import generate_demo_dataset
from data_modules.types import DataError


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def mvtec_tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mvtec"
    for i in range(3):
        write_png(root / "bottle" / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (60, 60, 3), dtype=np.uint8))
    write_png(root / "bottle" / "test" / "good" / "000.png", rng.integers(0, 255, (60, 60, 3), dtype=np.uint8))
    write_png(root / "bottle" / "test" / "crack" / "000.png", rng.integers(0, 255, (60, 60, 3), dtype=np.uint8))
    mask = np.zeros((60, 60), np.uint8)
    mask[10:20, 30:50] = 255
    write_png(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", mask)
    return root


def datamodule(root, **source_settings):
    """The data module a run on one MVTec-layout source builds (``dataset=mvtec_ad``), with small loaders."""
    source = {"kind": "mvtec_ad", "root": str(root), **source_settings}
    return AnomalyDataModule({"mvtec_ad": source}, image_size=56, resize=64, batch_size=2, test_batch_size=2,
                             num_workers=0)


def test_mvtec_layout_is_listed_and_aligned(mvtec_tree):
    dm = datamodule(mvtec_tree)
    dm.setup()
    assert len(dm.train_set) == 3 and len(dm.test_set) == 2
    assert dm.test_class_keys == ["mvtec_ad/bottle"]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, 56, 56)
    crack = batch["defect_type"].index("crack")
    assert batch["label"].tolist()[crack] == 1
    gt = batch["gt_mask"][crack, 0]
    # mask rows 10..20 of 60 px -> about 11..22 of 64 after resize, minus the 4 px crop
    assert gt[12:16, 36:48].all() and gt.sum() > 0 and not gt[30:].any()
    assert batch["gt_mask"][1 - crack].sum() == 0


def test_train_batches_have_a_jittered_copy(mvtec_tree):
    dm = datamodule(mvtec_tree)
    dm.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == batch["image_ae"].shape
    assert not torch.equal(batch["image"], batch["image_ae"])


def test_missing_mask_names_the_expected_file(mvtec_tree):
    (mvtec_tree / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    dm = datamodule(mvtec_tree)
    with pytest.raises(DataError, match=r"expected bottle/ground_truth/crack/000_mask.png"):
        dm.setup("test")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    dm = datamodule(tmp_path / "absent", download_hint="Download it from X.")
    with pytest.raises(DataError, match=r"absent.*Download it from X"):
        dm.setup()


def test_unknown_class_lists_available(mvtec_tree):
    with pytest.raises(DataError, match=r"unknown class\(es\) \['cable'\].*available: \['bottle'\]"):
        datamodule(mvtec_tree, classes=["cable"]).setup()


def test_corrupt_image_is_named(mvtec_tree):
    bad = mvtec_tree / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(b"not a png")
    dm = datamodule(mvtec_tree)
    with pytest.raises(DataError, match="001.png: not a readable image"):  # before training, not mid-epoch
        dm.setup("fit")


def test_grayscale_and_16_bit_images_become_rgb(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(path)
    img = open_image(path)
    assert img.mode == "RGB" and np.asarray(img).max() == 255 and np.asarray(img).min() == 0


def test_component_masks_round_trip_and_transform(tmp_path):
    masks = np.zeros((2, 30, 45), bool)
    masks[0, :10, :20] = True
    masks[1, 15:, 30:] = True
    path = tmp_path / "m.npz"
    save_component_masks(path, masks)
    assert np.array_equal(read_component_masks(path), masks)
    out = AnomalyTransforms(resize=64, crop=56).masks(masks)
    assert out.shape == (2, 56, 56) and out.dtype == torch.uint8 and out[0, 0, 0] == 1 and out[1, 0, 0] == 0


def test_collate_pads_component_masks():
    items = [{"image": torch.zeros(3, 8, 8), "masks": torch.ones(k, 8, 8, dtype=torch.uint8)} for k in (2, 0, 1)]
    batch = collate_samples(items)
    assert batch["masks"].shape == (3, 2, 8, 8)
    assert batch["num_masks"].tolist() == [2, 0, 1]
    assert batch["masks"][2, 1].sum() == 0


def test_missing_component_masks_are_an_error(mvtec_tree, tmp_path):
    dm = datamodule(mvtec_tree, component_masks=str(tmp_path / "masks"))
    with pytest.raises(DataError, match="component masks folder of dataset .* not found.*mode=segment"):
        dm.setup("fit")


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_generation_is_deterministic_and_idempotent(tmp_path):
    args = dict(seed=3, size=64, num_train=2, num_test_good=1, num_test_defect=1)
    assert generate_demo_dataset(tmp_path / "a", **args)
    assert not generate_demo_dataset(tmp_path / "a", **args), "second call finds it and does nothing"
    generate_demo_dataset(tmp_path / "b", **args)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    parts = read_component_masks(component_path(tmp_path / "a" / "components_true", "widget", "test", "missing", "000"))
    assert parts.shape[0] == 3 and (parts.sum((1, 2)) == 0).sum() == 1, "one part slot is empty when a part is missing"


def test_demo_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate_demo_dataset(tmp_path, size=64, num_train=1, num_test_good=1, num_test_defect=1)
