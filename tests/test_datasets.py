"""Dataset families: small fake trees in each download layout, converted by ``mode=prepare``,
loaded through the datamodule (counts, labels, mask alignment), bad input, several datasets in
one datamodule, balanced sampling and its resume.

Mask alignment: image ``k`` of a tree gets a mask covering the 4-pixel column band
``[4 (k % 8), 4 (k % 8) + 4)`` of a 32 px image, so a loaded mask tells which image it belongs to.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from PIL import Image

from data_modules.dataset import BalancedSampler
from data_modules.prepare import PUBLISHED, prepare_dataset, validate_prepared
from data_modules.prepare.counts import Published
from data_modules.prepare.mvtec import xyz_path
from data_modules.types import DataError
from src.modes.prepare import run as run_prepare
from tests.conftest import compose_cfg

SIZE = 32
LOADER = ["dataset.image_size=32", "dataset.resize=32", "dataset.num_workers=0", "dataset.batch_size=2",
          "dataset.test_batch_size=4"]


# --------------------------------------------------------------------------- writing fake downloads
def write_image(path: Path, k: int, mode: str = "RGB", size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """A small image whose content depends on ``k``; ``mode`` RGB, L or I;16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(k)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def band(k: int, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """(H, W) bool: the column band that identifies image ``k``."""
    w, h = size
    mask = np.zeros((h, w), bool)
    start = 4 * (k % 8) * w // SIZE
    mask[:, start : start + 4 * w // SIZE] = True
    return mask


def write_mask(path: Path, k: int, value: int = 255, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(band(k, size).astype(np.uint8) * value).save(path)
    return path


def write_empty_mask(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(path)
    return path


def fake_mvtec_ad(root: Path) -> Path:
    for k in range(3):
        write_image(root / "bottle" / "train" / "good" / f"{k:03d}.png", k)
    write_image(root / "bottle" / "test" / "good" / "000.png", 10)
    for k in range(2):
        write_image(root / "bottle" / "test" / "crack" / f"{k:03d}.png", 20 + k)
        write_mask(root / "bottle" / "ground_truth" / "crack" / f"{k:03d}_mask.png", k)
    return root


def fake_visa(root: Path) -> Path:
    """Class candle: 4 train normals, 2 test normals, 3 anomalies whose masks hold the value 1."""
    rows = []
    for k in range(6):
        rel = f"candle/Data/Images/Normal/{k:04d}.JPG"
        write_image(root / rel, k)
        rows.append(("candle", "train" if k < 4 else "test", "normal", rel, ""))
    for k in range(3):
        rel, mask = f"candle/Data/Images/Anomaly/{k:03d}.JPG", f"candle/Data/Masks/Anomaly/{k:03d}.png"
        write_image(root / rel, 100 + k)
        write_mask(root / mask, k, value=1)
        rows.append(("candle", "test", "anomaly", rel, mask))
    write_split(root, rows)
    return root


def write_split(root: Path, rows: list[tuple]) -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)


def fake_loco(root: Path) -> Path:
    c = root / "juice_bottle"
    for k in range(3):
        write_image(c / "train" / "good" / f"{k:03d}.png", k)
    for k in range(2):
        write_image(c / "validation" / "good" / f"{k:03d}.png", 30 + k)
    write_image(c / "test" / "good" / "000.png", 40)
    for t, kinds in (("logical_anomalies", 2), ("structural_anomalies", 1)):
        for k in range(kinds):
            write_image(c / "test" / t / f"{k:03d}.png", 50 + k)
            # two masks per image: the two halves of the band (rows), merged by the converter
            full = band(k)
            for j, rows in enumerate((slice(0, SIZE // 2), slice(SIZE // 2, SIZE))):
                part = np.zeros_like(full)
                part[rows] = full[rows]
                path = c / "ground_truth" / t / f"{k:03d}" / f"{j:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(part.astype(np.uint8) * (100 + j)).save(path)
    return root


def fake_mvtec_3d(root: Path) -> Path:
    c = root / "bagel"
    items = [("train", "good", 3), ("validation", "good", 1), ("test", "good", 1), ("test", "crack", 2)]
    for split, kind, n in items:
        for k in range(n):
            base = c / split / kind
            write_image(base / "rgb" / f"{k:03d}.png", k)
            (base / "xyz").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((SIZE, SIZE), k, np.float32)).save(base / "xyz" / f"{k:03d}.tiff")
            if split == "test":
                (write_mask if kind != "good" else lambda p, k: write_empty_mask(p))(base / "gt" / f"{k:03d}.png", k)
    return root


def fake_ped2(root: Path) -> Path:
    """Two training clips of 2 grayscale TIFF frames; one test clip of 4 frames, two with empty masks."""
    base = root / "UCSDped2"
    for clip in ("Train001", "Train002"):
        for f in range(1, 3):
            write_image(base / "Train" / clip / f"{f:03d}.tif", f, mode="L")
    (base / "Train" / "Train001" / "._001.tif").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    for f in range(1, 5):
        write_image(base / "Test" / "Test001" / f"{f:03d}.tif", 10 + f, mode="L")
        gt = base / "Test" / "Test001_gt" / f"{f:03d}.bmp"
        write_empty_mask(gt) if f <= 2 else write_mask(gt, f)
    return root


def fake_bmad(root: Path, subset: str = "BrainMRI") -> Path:
    """16-bit grayscale images; valid and test with good and Ungood."""
    base = root / subset
    for k in range(3):
        write_image(base / "train" / "good" / "img" / f"{k}.png", k, mode="I;16")
    for split in ("valid", "test"):
        write_image(base / split / "good" / "img" / "100.png", 100, mode="I;16")
        write_empty_mask(base / split / "good" / "label" / "100.png")
        for k in range(2):
            write_image(base / split / "Ungood" / "img" / f"{k}.png", 200 + k, mode="I;16")
            write_mask(base / split / "Ungood" / "label" / f"{k}.png", k)
    return root


# --------------------------------------------------------------------------- helpers
def prepared(tmp_path: Path, name: str, source: Path, *extra: str):
    """Run mode=prepare on ``source`` and return the datamodule of the prepared dataset."""
    overrides = [f"dataset={name}", f"dataset.source={source}", f"dataset.root={tmp_path / 'prepared'}",
                 f"paths.output_dir={tmp_path / 'out'}", *LOADER, *extra]
    cfg = compose_cfg(overrides)
    run_prepare(cfg)
    # No component masks were computed for the fake trees (the default reads the mode=segment cache).
    cfg = compose_cfg([o for o in overrides if not o.startswith("dataset.source=")] + ["dataset.component_masks=null"])
    return instantiate(cfg.dataset)


def loaded(dm, stage: str = "test") -> dict:
    dm.setup(stage)
    loader = dm.test_dataloader() if stage == "test" else dm.train_dataloader()
    batches = list(loader)
    out = {k: [] for k in ("label", "defect_type", "image_path", "dataset", "class_name")}
    out["gt"] = []
    for b in batches:
        for k in out:
            if k != "gt":
                out[k] += b[k].tolist() if torch.is_tensor(b[k]) else list(b[k])
        if "gt_mask" in b:
            out["gt"] += list(b["gt_mask"][:, 0].bool())
    return out


def check_masks_aligned(out: dict, index_of) -> int:
    """Every anomalous image's mask is the band of its own index; normal ones are empty."""
    checked = 0
    for label, path, gt in zip(out["label"], out["image_path"], out["gt"]):
        if label == 0:
            assert not gt.any(), f"normal image {path} has a non-empty mask"
            continue
        expected = torch.from_numpy(band(index_of(Path(path))))
        assert torch.equal(gt, expected), f"mask of {path} is not its own"
        checked += 1
    return checked


# --------------------------------------------------------------------------- each family
def test_mvtec_ad_is_linked_checked_and_loaded(tmp_path):
    dm = prepared(tmp_path, "mvtec_ad", fake_mvtec_ad(tmp_path / "download"))
    out = loaded(dm)
    assert dm.test_class_keys == ["mvtec_ad/bottle"]
    assert sorted(out["label"]) == [0, 1, 1] and set(out["defect_type"]) == {"good", "crack"}
    assert check_masks_aligned(out, lambda p: int(p.stem)) == 2
    assert len(loaded(dm, "fit")["label"]) == 2  # 3 images, batch 2, drop_last


def test_mvtec_ad_without_source_is_validated_in_place(tmp_path):
    root = fake_mvtec_ad(tmp_path / "mvtec")
    result = prepare_dataset("mvtec_ad", root, None, None, "mvtec_ad")
    assert result.status.startswith("validated in place")
    assert any("mvtec_ad/bottle: 3 training images, published 209 (206 missing)" in w for w in result.validation.warnings)
    assert any("class missing" in w and "mvtec_ad/cable" in w for w in result.validation.warnings)


def test_visa_one_class_split(tmp_path):
    dm = prepared(tmp_path, "visa", fake_visa(tmp_path / "VisA_20220922"))
    root = tmp_path / "prepared"
    assert len(list((root / "candle" / "train" / "good").glob("*.JPG"))) == 4
    out = loaded(dm)
    assert out["label"].count(0) == 2 and out["label"].count(1) == 3 and set(out["defect_type"]) == {"good", "bad"}
    assert check_masks_aligned(out, lambda p: int(p.stem)) == 3  # masks of value 1 are anomalous pixels
    assert set(out["dataset"]) == {"visa"} and set(out["class_name"]) == {"candle"}


def test_visa_prepare_twice_does_nothing_the_second_time(tmp_path, caplog):
    source = fake_visa(tmp_path / "VisA")
    prepared(tmp_path, "visa", source)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "prepared").rglob("*")}
    with caplog.at_level(logging.INFO):
        prepared(tmp_path, "visa", source)
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "prepared").rglob("*")} == stamp


def test_loco_masks_merged_types_apart_validation_kept(tmp_path):
    dm = prepared(tmp_path, "mvtec_loco", fake_loco(tmp_path / "loco"), "dataset.validation_split=true")
    out = loaded(dm)
    assert sorted(set(out["defect_type"])) == ["good", "logical_anomalies", "structural_anomalies"]
    assert check_masks_aligned(out, lambda p: int(p.stem)) == 3  # the two halves were merged into one band
    assert len(dm.val_set) == 2 and all(s.split == "validation" for s in dm.val_set.samples)
    summary = (tmp_path / "prepared" / ".prepared.json").read_text()
    assert '"masks of one image merged into one": 6' in summary


def test_mvtec_3d_rgb_used_xyz_kept(tmp_path):
    dm = prepared(tmp_path, "mvtec_3d", fake_mvtec_3d(tmp_path / "3d"))
    out = loaded(dm)
    assert sorted(out["label"]) == [0, 1, 1] and check_masks_aligned(out, lambda p: int(p.stem)) == 2
    xyz = xyz_path(Path(out["image_path"][0]))
    assert xyz.is_file() and xyz.suffix == ".tiff" and "xyz" in xyz.parts
    assert not (tmp_path / "prepared" / "bagel" / "ground_truth" / "good").exists()  # all-zero masks not written
    assert len(list((tmp_path / "prepared" / "bagel" / "validation" / "good").iterdir())) == 1


def test_ped2_frames_clips_and_empty_masks(tmp_path):
    dm = prepared(tmp_path, "ped2", fake_ped2(tmp_path / "UCSD_Anomaly_Dataset.v1p2"))
    root = tmp_path / "prepared" / "pedestrian"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [
        "Train001_001.png", "Train001_002.png", "Train002_001.png", "Train002_002.png"]
    assert sorted(p.name for p in (root / "test" / "good").iterdir()) == ["Test001_001.png", "Test001_002.png"]
    out = loaded(dm)
    assert check_masks_aligned(out, lambda p: int(p.stem.split("_")[1])) == 2
    summary = (tmp_path / "prepared" / ".prepared.json").read_text()
    assert '"hidden files (._*) ignored": 1' in summary and '".tif image re-encoded as PNG": 8' in summary


def test_bmad_16_bit_grayscale_with_validation_split(tmp_path):
    dm = prepared(tmp_path, "bmad_brain", fake_bmad(tmp_path / "bmad"), "dataset.validation_split=true")
    out = loaded(dm)
    assert dm.test_class_keys == ["bmad_brain/BrainMRI"]
    assert sorted(out["label"]) == [0, 1, 1] and check_masks_aligned(out, lambda p: int(p.stem)) == 2
    assert len(dm.val_set) == 3 and sum(s.label for s in dm.val_set.samples) == 2
    item = dm.val_set[1]
    assert item["image"].shape == (3, SIZE, SIZE) and item["gt_mask"].sum() > 0
    assert len(loaded(dm, "fit")["label"]) == 2


# --------------------------------------------------------------------------- bad input
def test_corrupt_and_truncated_images_are_named_or_skipped_and_counted(tmp_path):
    source = fake_visa(tmp_path / "VisA")
    bad = source / "candle/Data/Images/Normal/0001.JPG"
    bad.write_bytes(b"not a jpeg")
    truncated = source / "candle/Data/Images/Normal/0002.JPG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DataError, match=r"0001.JPG: unreadable image.*skip_bad"):
        prepared(tmp_path, "visa", source)
    assert not (tmp_path / "prepared").exists(), "a failed conversion leaves nothing behind"
    dm = prepared(tmp_path, "visa", source, "dataset.skip_bad=true")
    dm.setup("fit")
    assert len(dm.train_set) == 2
    summary = (tmp_path / "prepared" / ".prepared.json").read_text()
    assert summary.count("unreadable image") == 2 and "0002.JPG" in summary


def test_defect_image_without_mask(tmp_path):
    source = fake_visa(tmp_path / "VisA")
    (source / "candle/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(DataError, match=r"001.JPG: defect image without its mask"):
        prepared(tmp_path, "visa", source)
    dm = prepared(tmp_path, "visa", source, "dataset.skip_bad=true")
    out = loaded(dm)
    assert out["label"].count(1) == 2 and check_masks_aligned(out, lambda p: int(p.stem)) == 2


def test_mask_of_another_size(tmp_path):
    source = fake_mvtec_ad(tmp_path / "download")
    write_mask(source / "bottle" / "ground_truth" / "crack" / "001_mask.png", 1, size=(64, 64))  # same aspect
    dm = prepared(tmp_path, "mvtec_ad", source)
    assert check_masks_aligned(loaded(dm), lambda p: int(p.stem)) == 2
    assert '"mask resized to its image (nearest)": 1' in (tmp_path / "prepared" / ".prepared.json").read_text()
    write_mask(source / "bottle" / "ground_truth" / "crack" / "001_mask.png", 1, size=(64, 32))
    with pytest.raises(DataError, match=r"001_mask.png is 64x32 but its image is 32x32"):
        prepared(tmp_path / "again", "mvtec_ad", source)


def test_loader_refuses_a_mask_of_another_size(tmp_path):
    root = fake_mvtec_ad(tmp_path / "mvtec")
    write_mask(root / "bottle" / "ground_truth" / "crack" / "001_mask.png", 1, size=(64, 64))
    dm = instantiate(compose_cfg(["dataset=mvtec_ad", f"dataset.root={root}", *LOADER]).dataset)
    with pytest.raises(DataError, match=r"001_mask.png: mask is 64x64 but its image .*001.png is 32x32.*mode=prepare"):
        dm.setup("test")  # found when the test set is listed, before any image is scored


def test_empty_class_folder_is_an_error(tmp_path):
    source = fake_mvtec_ad(tmp_path / "download")
    (source / "cable" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"cable/train/good holds no images"):
        prepared(tmp_path, "mvtec_ad", source)


def test_unknown_class_and_dataset_names(tmp_path):
    with pytest.raises(DataError, match=r"unknown class\(es\) \['nope'\].*available: \['bottle'\]"):
        prepared(tmp_path, "mvtec_ad", fake_mvtec_ad(tmp_path / "download"), "dataset.classes=[nope]")
    with pytest.raises(MissingConfigException, match=r"dataset/nope(.|\n)*visa"):
        compose_cfg(["dataset=nope"])


def test_wrong_download_folder_says_what_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"split_csv/1cls.csv not found"):
        prepared(tmp_path, "visa", tmp_path / "empty")
    with pytest.raises(DataError, match=r"no Train/ and Test/"):
        prepared(tmp_path, "ped2", tmp_path / "empty")


def test_root_with_foreign_files_is_not_overwritten(tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match=r"not empty and was not written by mode=prepare"):
        prepared(tmp_path, "visa", fake_visa(tmp_path / "VisA"))


def test_validation_against_published_counts(tmp_path):
    root = fake_mvtec_ad(tmp_path / "mvtec")
    (root / "bottle" / "ground_truth" / "crack" / "007_mask.png").write_bytes(b"")
    table = {"bottle": Published(train=3, test=4, test_good=1)}
    report = validate_prepared(root, "mvtec_ad", table)
    assert report.warnings == [
        "mvtec_ad/bottle: mask ground_truth/crack/007_mask.png has no image",
        "mvtec_ad/bottle: 3 test images, published 4 (1 missing)",
    ]
    assert sum(len(t) for t in PUBLISHED.values()) == 46  # every class of the paper's training set
    totals = {name: (sum(p.train for p in t.values()), sum(p.test for p in t.values())) for name, t in PUBLISHED.items()}
    # the per-class rows add up to the totals the datasets' papers give
    assert totals["mvtec_ad"] == (3629, 1725) and totals["visa"] == (8659, 2162)
    assert totals["mvtec_loco"] == (1772, 1568) and totals["mvtec_3d"] == (2656, 1197)


# --------------------------------------------------------------------------- several datasets
def two_sources(tmp_path, small_demo_root, *extra):
    prepared(tmp_path, "visa", fake_visa(tmp_path / "VisA"))
    cfg = compose_cfg([
        "dataset=[demo,visa]", f"dataset.sources.demo.root={small_demo_root}",
        f"dataset.sources.demo.component_masks={small_demo_root}/components_true",
        "+dataset.sources.demo.generate_size=96", "+dataset.sources.demo.num_train=8",
        "+dataset.sources.demo.num_test_good=4", "+dataset.sources.demo.num_test_defect=2",
        f"dataset.sources.visa.root={tmp_path / 'prepared'}", "dataset.sources.visa.component_masks=null", *LOADER, *extra,
    ])
    return instantiate(cfg.dataset)


def test_two_datasets_in_one_datamodule(tmp_path, small_demo_root):
    dm = two_sources(tmp_path, small_demo_root)
    dm.setup()
    assert dm.test_class_keys == ["demo/fabric", "demo/widget", "visa/candle"]
    assert len(dm.train_set) == 16 + 4
    batch = next(iter(dm.test_dataloader()))
    assert "masks" in batch and "dataset" in batch
    visa = [i for i, d in enumerate(dm.test_set.samples) if d.dataset == "visa"]
    item = dm.test_set[visa[0]]
    assert item["masks"].shape[0] == 0 and item["class_index"] == 2  # no component masks for VisA
    assert dm.test_set.display_image(visa[0]).shape == (SIZE, SIZE, 3)
    assert len(list(dm.normal_dataloader(2))) >= 1


def test_balance_by_dataset_and_exact_resume(tmp_path, small_demo_root):
    dm = two_sources(tmp_path, small_demo_root, "dataset.balance=dataset")
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedSampler)
    torch.manual_seed(0)
    sampler = dm.train_sampler()
    draws = [dm.train_set.samples[i].dataset for _ in range(20) for i in sampler]
    assert 0.4 < draws.count("visa") / len(draws) < 0.6  # 4 of 20 images, half of the draws
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    expected = [b["image_path"] for b in it][:3]
    torch.manual_seed(1)  # a fresh sampler has another seed: the saved state restores it
    resumed = dm.train_dataloader()
    assert resumed.sampler.seed != loader.sampler.seed
    resumed.load_state_dict(state)
    assert [b["image_path"] for b in resumed][:3] == expected


def test_balanced_sampler_draws_by_weight_per_epoch():
    sampler = BalancedSampler([0.9, 0.1], 1000, seed=0)
    draws = list(sampler)
    assert len(draws) == 1000 and 850 < draws.count(0) < 950
    assert list(sampler) != draws, "the next pass is the next epoch"
    sampler.set_epoch(0)
    assert list(sampler) == draws, "the order is a function of (seed, epoch)"


def test_top_level_source_keys_are_ambiguous_with_several_datasets():
    with pytest.raises(InstantiationException, match=r"dataset.sources.demo.classes, dataset.sources.visa.classes"):
        instantiate(compose_cfg(["dataset=[demo,visa]", "dataset.classes=[a]"]).dataset)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_prepare_cli_twice_then_train_on_demo_and_visa(tmp_path, small_demo_root):
    """``mode=prepare`` from the command line (the second run does nothing), then one model
    trained for two steps on the demo and the converted VisA tree, reported per dataset."""
    import json

    from tests.test_workflow import run_cli

    source, root = fake_visa(tmp_path / "VisA"), tmp_path / "visa"
    prepare = ["mode=prepare", "dataset=visa", f"dataset.source={source}", f"dataset.root={root}"]
    first = run_cli(*prepare, f"paths.output_dir={tmp_path / 'p1'}")
    assert "visa: converted" in first.stdout and (root / "candle" / "ground_truth" / "bad" / "000_mask.png").is_file()
    second = run_cli(*prepare, f"paths.output_dir={tmp_path / 'p2'}")
    assert "already prepared, nothing done" in second.stdout
    assert json.loads((tmp_path / "p2" / "prepare.json").read_text())["visa"]["warnings"]  # 6 images, not 10,821

    masks = tmp_path / "visa_masks"  # component masks of the converted dataset (colour features: fast)
    run_cli("mode=segment", "dataset=visa", f"dataset.root={root}", "segment.features=color", "segment.k=3",
            "segment.image_size=56", f"segment.output={masks}", f"paths.output_dir={tmp_path / 's'}")
    assert (masks / "candle" / "test" / "bad" / "000.npz").is_file()

    out = tmp_path / "train"
    run_cli(
        "experiment=demo", "dataset=[demo,visa]", f"dataset.sources.visa.component_masks={masks}", f"dataset.sources.demo.root={small_demo_root}",
        f"dataset.sources.demo.component_masks={small_demo_root}/components_true",
        "+dataset.sources.demo.generate_size=96", "+dataset.sources.demo.num_train=8",
        "+dataset.sources.demo.num_test_good=4", "+dataset.sources.demo.num_test_defect=2",
        f"dataset.sources.visa.root={root}", "dataset.image_size=56", "dataset.resize=64", "dataset.batch_size=4",
        "dataset.balance=dataset", "trainer.max_steps=2", "module.scheduler.warmup_steps=1",
        "evaluation.calibration.images_per_class=2", f"paths.output_dir={out}",
    )
    report = json.loads((out / "results.json").read_text())
    assert set(report["classes"]) == {"demo/fabric", "demo/widget", "visa/candle"}
    assert set(report["datasets"]) == {"demo", "visa"} and report["datasets"]["visa"]["num_classes"] == 1


def test_single_source_reads_like_one_datamodule(tmp_path):
    root = fake_mvtec_ad(tmp_path / "mvtec")
    dm = instantiate(compose_cfg(["dataset=mvtec_ad", f"dataset.root={root}", "dataset.name=mine", *LOADER]).dataset)
    assert dm.name == "mine" and dm.roots == {"mine": root} and dm.class_names() == ["mine/bottle"]
    assert dm.test_class_keys == ["mine/bottle"] and len(dm.list_samples("mine/bottle", "test")) == 3
    both = instantiate(compose_cfg(["dataset=[mvtec_ad,visa]", f"dataset.sources.mvtec_ad.root={root}",
                                   f"dataset.sources.visa.root={root}"]).dataset)
    assert both.name == "mvtec_ad+visa" and both.class_names()[0] == "mvtec_ad/bottle"
    assert len(both.list_samples("mvtec_ad/bottle", "train")) == 3


def test_prepare_several_datasets_reports_each(tmp_path):
    cfg = compose_cfg([
        "dataset=[visa,ped2]", f"dataset.sources.visa.source={fake_visa(tmp_path / 'VisA')}",
        f"dataset.sources.visa.root={tmp_path / 'visa'}", f"dataset.sources.ped2.source={tmp_path / 'absent'}",
        f"dataset.sources.ped2.root={tmp_path / 'ped2'}", f"paths.output_dir={tmp_path / 'out'}",
    ])
    with pytest.raises(DataError, match=r"1 of 2 datasets could not be prepared:\n  ped2: .*absent"):
        run_prepare(cfg)
    assert (tmp_path / "visa" / ".prepared.json").is_file() and not (tmp_path / "ped2").exists()
