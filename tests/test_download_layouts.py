"""BMAD's three subsets in the layouts that are distributed, converted by ``mode=prepare`` and read
by the datamodule a run builds.

Where the layout facts come from:

* BrainMRI (``BraTS2021_slice/``): training slices directly in ``train/good/*.png`` (no ``img/``),
  then ``valid/{good,Ungood}/{img,label}``, ``test/good/img`` and ``test/Ungood/{img,label}``; read
  this way by BMAD's own MKD loader (its ``data.py`` lists ``train/good/``) and by anomalib's
  ``bmad.py``.
* LiverCT (``Liver/Train/hist_DIY/``): ``train/good/*.png``, then ``{valid,test}/img/{good,Ungood}``
  and ``{valid,test}/label/Ungood``: ``img`` and ``label`` above ``good``/``Ungood`` (BMAD's
  ``data_processing/liver/liver.py``, which writes the archive).
* RESC (``RESC/``): ``train/good/*.png`` and a validation folder named ``val/``
  (``val/good/img``, ``val/Ungood/{img,label}``), ``test/{good,Ungood}/{img,label}``.
* BMAD's slices and labels are often RGBA PNGs (written with matplotlib's ``plt.imsave``): an
  opaque grey image, and a label whose anomalous pixels are white, its others black.
* BMAD's README drawing (``train/good/img``, ``{valid,test}/{good,Ungood}/{img,label}``) is kept
  by ``tests/test_datasets.py::fake_bmad``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.types import DataError
from tests.test_datasets import SIZE, band, check_masks_aligned, loaded, prepared


def rgba_slice(path: Path, k: int) -> Path:
    """An opaque grey RGBA slice, as ``plt.imsave(..., cmap="gray")`` writes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.random.default_rng(k).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)]), "RGBA").save(path)
    return path


def rgba_label(path: Path, k: int | None) -> Path:
    """An RGBA label: white on the band of image ``k`` (all black when ``k`` is None), opaque."""
    path.parent.mkdir(parents=True, exist_ok=True)
    on = band(k) if k is not None else np.zeros((SIZE, SIZE), bool)
    v = on.astype(np.uint8) * 255
    Image.fromarray(np.dstack([v, v, v, np.full_like(v, 255)]), "RGBA").save(path)
    return path


def types_above_img(base: Path, splits: tuple[str, str], digits: int = 0) -> None:
    """``train/good/*.png`` and ``<split>/{good,Ungood}/{img,label}`` below ``base`` (BrainMRI, RESC);
    file names are numbers, zero-padded to ``digits``."""
    for k in range(3):
        rgba_slice(base / "train" / "good" / f"{k:0{digits}d}.png", k)
    for split in splits:
        rgba_slice(base / split / "good" / "img" / f"{100:0{digits}d}.png", 100)
        for k in range(2):
            rgba_slice(base / split / "Ungood" / "img" / f"{k:0{digits}d}.png", 200 + k)
            rgba_label(base / split / "Ungood" / "label" / f"{k:0{digits}d}.png", k)


def brain_download(root: Path) -> Path:
    """``BraTS2021_slice/`` as distributed."""
    base = root / "BraTS2021_slice"
    types_above_img(base, ("valid", "test"), digits=5)
    rgba_label(base / "valid" / "good" / "label" / "00100.png", None)  # valid/good has labels, test/good not
    return root


def liver_download(root: Path) -> Path:
    """``Liver/Train/hist_DIY/`` as distributed: ``img`` and ``label`` above ``good``/``Ungood``."""
    base = root / "Liver" / "Train" / "hist_DIY"
    for k in range(3):
        rgba_slice(base / "train" / "good" / f"{k}.png", k)
    for split in ("valid", "test"):
        rgba_slice(base / split / "img" / "good" / "100.png", 100)
        for k in range(2):
            rgba_slice(base / split / "img" / "Ungood" / f"{k}.png", 200 + k)
            rgba_label(base / split / "label" / "Ungood" / f"{k}.png", k)
    return root


def resc_download(root: Path) -> Path:
    """``RESC/`` as distributed: ``train/good/*.png`` and ``val/``."""
    types_above_img(root / "RESC", ("val", "test"))
    return root


LAYOUTS = {"bmad_brain": (brain_download, "BrainMRI"), "bmad_liver": (liver_download, "LiverCT"),
           "bmad_resc": (resc_download, "RESC")}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("given", ["subset folder", "parent folder"])
def test_bmad_as_distributed_converts_and_loads(tmp_path, name, given):
    make, subset = LAYOUTS[name]
    download = make(tmp_path / "download")
    subset_root = next(p for p in download.rglob("train") if p.is_dir()).parent
    source = subset_root if given == "subset folder" else download
    dm = prepared(tmp_path, name, source, "dataset.validation_split=true")
    out = loaded(dm)
    assert dm.test_class_keys == [f"{name}/{subset}"]
    assert sorted(out["label"]) == [0, 1, 1]
    assert check_masks_aligned(out, lambda p: int(p.stem)) == 2
    assert len(dm.val_set) == 3 and sum(s.label for s in dm.val_set.samples) == 2
    assert dm.val_set[1]["image"].shape == (3, SIZE, SIZE)
    dm.setup("fit")
    assert len(dm.train_set) == 3


def test_bmad_parent_with_all_three_subsets_picks_each(tmp_path):
    download = tmp_path / "BMAD"
    brain_download(download), liver_download(download), resc_download(download)
    for name, (_, subset) in sorted(LAYOUTS.items()):
        dm = prepared(tmp_path / name, name, download)
        assert dm.test_class_keys == [f"{name}/{subset}"]
        dm.setup("fit")
    assert len(dm.train_set) == 3


def test_bmad_folder_without_the_subset_names_what_it_expected_and_found(tmp_path):
    (tmp_path / "elsewhere" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no BMAD LiverCT folder under .*elsewhere.*train/good.*found: images/"):
        prepared(tmp_path, "bmad_liver", tmp_path / "elsewhere")


def test_bmad_two_candidates_for_one_subset_are_named(tmp_path):
    resc_download(tmp_path / "a"), resc_download(tmp_path / "b")
    with pytest.raises(DataError, match=r"2 BMAD RESC folders under .*a/RESC.*b/RESC.*dataset.source="):
        prepared(tmp_path, "bmad_resc", tmp_path)


# --------------------------------------------------------------------------- one orientation rule
def exif_rotated_jpeg(path: Path, k: int) -> Path:
    """A 48x32 JPEG (stored pixels) whose EXIF says "rotate 90°": upright it is 32x48."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(k).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    img.save(path, exif=exif)
    return path


@pytest.mark.parametrize("mask_size", [(48, 32), (32, 48)], ids=["stored size", "upright size"])
def test_prepare_and_the_loader_apply_one_orientation_rule(tmp_path, mask_size):
    """A mask is compared with its image upright (EXIF orientation applied) by mode=prepare, as by
    the loader: a mask at the stored size of a rotated image is refused by prepare, naming both."""
    from tests.test_datasets import fake_mvtec_ad

    source = fake_mvtec_ad(tmp_path / "mvtec")
    (source / "bottle" / "test" / "crack" / "000.png").unlink()
    exif_rotated_jpeg(source / "bottle" / "test" / "crack" / "000.jpg", 0)
    mask = np.zeros(mask_size[::-1], np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(source / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    if mask_size == (48, 32):
        with pytest.raises(DataError, match=r"000_mask.png is 48x32 but its image is 32x48 once its EXIF orientation"):
            prepared(tmp_path, "mvtec_ad", source)
        return
    out = loaded(prepared(tmp_path, "mvtec_ad", source, "dataset.image_size=32", "dataset.resize=32"))
    (gt,) = [g for g, p in zip(out["gt"], out["image_path"]) if p.endswith("000.jpg")]
    assert gt.sum() > 0


# --------------------------------------------------------------------------- UCSD Ped2's frame labels
def test_ped2_frame_labels_come_from_the_m_file_and_disagreements_are_reported(tmp_path, caplog):
    """``UCSDped2/Test/UCSDped2.m`` as distributed (UCSD_Anomaly_Dataset.v1p2): one
    ``TestVideoFile{end+1}.gt_frame = [a:b];`` line per clip, 1-based frame numbers; frames are
    ``TestNNN/FFF.tif`` with masks ``TestNNN_gt/FFF.bmp`` (pixel masks exist for all 12 Ped2 clips)."""
    from tests.test_datasets import fake_ped2

    source = fake_ped2(tmp_path / "UCSD_Anomaly_Dataset.v1p2")  # Test001: frames 1-2 empty masks, 3-4 not
    (source / "UCSDped2" / "Test" / "UCSDped2.m").write_text(
        "TestVideoFile = {};\r\n% Test001: the masks of frame 2 are empty, frame 4 is not listed\r\n"
        "TestVideoFile{end+1}.gt_frame = [2:3];\r\n")
    with caplog.at_level("WARNING"):
        dm = prepared(tmp_path, "ped2", source)
    root = tmp_path / "prepared" / "pedestrian"
    assert sorted(p.name for p in (root / "test" / "good").iterdir()) == ["Test001_001.png", "Test001_004.png"]
    assert sorted(p.name for p in (root / "test" / "anomaly").iterdir()) == ["Test001_002.png", "Test001_003.png"]
    assert "2 test frames where" in caplog.text
    assert "Test001/002.tif: UCSDped2.m says anomalous, its mask is empty" in caplog.text
    assert "Test001/004.tif: UCSDped2.m says normal, its mask is not empty" in caplog.text
    out = loaded(dm)
    labels = {Path(p).name: label for p, label in zip(out["image_path"], out["label"])}
    assert labels == {"Test001_001.png": 0, "Test001_002.png": 1, "Test001_003.png": 1, "Test001_004.png": 0}


def test_ped2_m_file_that_lists_another_number_of_clips_is_refused(tmp_path):
    from tests.test_datasets import fake_ped2

    source = fake_ped2(tmp_path / "ucsd")
    (source / "UCSDped2" / "Test" / "UCSDped2.m").write_text(
        "TestVideoFile{end+1}.gt_frame = [1:4];\nTestVideoFile{end+1}.gt_frame = [5:9];\n")
    with pytest.raises(DataError, match=r"UCSDped2.m lists 2 clips but .*Test holds 1 TestNNN folders"):
        prepared(tmp_path, "ped2", source)
