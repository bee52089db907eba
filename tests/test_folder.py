"""``dataset=folder``: a user's own images read in place, each layout, and the checks before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from data_modules.sources.folder import source_key
from data_modules.types import DataError
from tests.conftest import compose_cfg
from tests.test_datasets import LOADER, fake_mvtec_ad, write_image, write_mask


def own_images(root: Path, normals: int = 10, types: dict[str, int] | None = None, masks: bool = False,
               flat: bool = True) -> Path:
    """``root/good`` and anomalous images in ``root/bad`` (flat: one type) or ``root/bad/<type>``,
    with ``root/masks`` mirroring them when ``masks``."""
    for k in range(normals):
        write_image(root / "good" / f"n{k:02d}.png", k)
    for kind, count in (types or {}).items():
        folder = root / "bad" if flat else root / "bad" / kind
        for k in range(count):
            write_image(folder / f"{kind}{k}.png", 100 + k)
            if masks:
                write_mask((root / "masks" if flat else root / "masks" / kind) / f"{kind}{k}_mask.png", k)
    return root


def folder_module(source: Path, *extra: str, data_dir: Path | None = None):
    overrides = ["dataset=folder", f"dataset.source={source}", *LOADER, *extra]
    if data_dir is not None:
        overrides.append(f"paths.data_dir={data_dir}")
    return instantiate(compose_cfg(overrides).dataset)


def test_images_with_masks_are_read_in_place(tmp_path):
    source = own_images(tmp_path / "mine", types={"bad": 3}, masks=True)
    dm = folder_module(source)
    dm.setup("fit")
    dm.setup("test")
    assert dm.test_class_keys == ["folder/images"]
    assert len(dm.train_set) == 8 and len(dm.test_set) == 2 + 3  # 20 % of the normal images are held out
    anomalous = [i for i, s in enumerate(dm.test_set.samples) if s.label == 1]
    item = dm.test_set[anomalous[0]]
    assert item["has_gt"] and item["gt_mask"].sum() > 0 and item["defect_type"] == "bad"
    assert not any((tmp_path / "mine").glob("images")), "nothing is written into the user's folder"


def test_images_with_labels_only_have_no_ground_truth(tmp_path):
    source = own_images(tmp_path / "mine", types={"bad": 2})
    dm = folder_module(source)
    dm.setup("test")
    items = [dm.test_set[i] for i in range(len(dm.test_set))]
    assert [(i["label"], i["has_gt"]) for i in items] == [(0, True), (0, True), (1, False), (1, False)]
    assert all(s.mask_path is None for s in dm.test_set.samples)


def test_one_folder_per_defect_type(tmp_path):
    source = own_images(tmp_path / "mine", types={"scratch": 2, "stain": 1}, masks=True, flat=False)
    dm = folder_module(source)
    dm.setup("test")
    kinds = sorted({s.defect_type for s in dm.test_set.samples})
    assert kinds == ["good", "scratch", "stain"]
    assert all(s.mask_path.parent.name == s.defect_type for s in dm.test_set.samples if s.label)


def test_explicit_normal_test_folder(tmp_path):
    source = own_images(tmp_path / "mine", normals=6, types={"bad": 1})
    for k in range(3):
        write_image(source / "good_test" / f"t{k}.png", 50 + k)
    dm = folder_module(source, "dataset.sources.folder.normal_test_dir=good_test")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 6
    assert sorted(s.image_path.name for s in dm.test_set.samples if s.label == 0) == ["t0.png", "t1.png", "t2.png"]


def test_held_out_normals_are_a_seeded_random_share(tmp_path):
    source = own_images(tmp_path / "mine", normals=20, types={"bad": 1})

    def held(*extra):
        dm = folder_module(source, *extra)
        return sorted(s.image_path.name for s in dm.list_samples("folder/images", "test") if s.label == 0)

    first = held()
    assert len(first) == 4 and first == held() and first != [f"n{k:02d}.png" for k in range(4)]
    assert held("dataset.sources.folder.split_seed=1") != first
    assert len(held("dataset.sources.folder.normal_test_fraction=0.5")) == 10


def test_accepted_extensions(tmp_path):
    source = own_images(tmp_path / "mine", normals=5, types={"bad": 1})
    Image.open(source / "good" / "n00.png").convert("RGB").save(source / "good" / "extra.jpg")
    dm = folder_module(source, "dataset.sources.folder.extensions=[.png]", "dataset.sources.folder.normal_test_fraction=0")
    assert len(dm.list_samples("folder/images", "train")) == 5
    dm = folder_module(source, "dataset.sources.folder.normal_test_fraction=0")
    assert len(dm.list_samples("folder/images", "train")) == 6


def test_missing_source_says_what_to_set(tmp_path):
    dm = instantiate(compose_cfg(["dataset=folder", *LOADER]).dataset)
    with pytest.raises(DataError, match=r"set dataset.source=<folder>"):
        dm.setup("fit")


def test_validation_lists_every_problem_at_once(tmp_path):
    source = own_images(tmp_path / "mine", types={"bad": 4}, masks=True)
    (source / "good" / "n03.png").write_bytes(b"not a png")  # corrupt training image
    Image.open(source / "bad" / "bad0.png").save(source / "bad" / "bad0.jpg")  # same stem twice: one mask for both
    (source / "masks" / "bad1_mask.png").unlink()  # missing mask
    write_mask(source / "masks" / "bad2_mask.png", 2, size=(64, 64))  # mask of another size
    dm = folder_module(source)
    with pytest.raises(DataError) as err:
        dm.setup("fit")  # before the first step: the test split is checked too
    text = str(err.value)
    assert text.startswith("4 problem(s) in dataset 'folder'")
    for expected in ("good/n03.png: not a readable image", "bad0.png: same name as", "bad/bad1.png: anomalous image "
                     "without its mask (expected masks/bad1.png)", "masks/bad2_mask.png: mask is 64x64"):
        assert expected in text, text
    assert text.count("Fix:") == 4


def test_validation_finds_a_missing_mvtec_test_mask_before_training(tmp_path):
    root = fake_mvtec_ad(tmp_path / "mvtec")
    masks = sorted((root / "bottle" / "ground_truth").rglob("*_mask.png"))
    masks[0].unlink()
    (root / "bottle" / "train" / "good" / "000.png").write_bytes(b"")
    dm = instantiate(compose_cfg(["dataset=mvtec_ad", f"dataset.root={root}", "dataset.component_masks=null",
                                  *LOADER]).dataset)
    with pytest.raises(DataError, match=r"(?s)2 problem\(s\).*train/good/000.png.*without its mask"):
        dm.setup("fit")


def test_component_masks_of_each_source_are_kept_apart(tmp_path):
    first = own_images(tmp_path / "a" / "imgs", normals=4, types={"bad": 1})
    second = own_images(tmp_path / "b" / "imgs", normals=4, types={"bad": 1})
    a, b = folder_module(first, data_dir=tmp_path / "data"), folder_module(second, data_dir=tmp_path / "data")
    fa, fb = a.sources["folder"].component_folder, b.sources["folder"].component_folder
    assert fa != fb and fa.parent == fb.parent == tmp_path / "data" / "components" / "folder"
    assert fa.name == source_key(first) and a.component_root is None  # none computed: data without parts
    a.require_component_masks(2)  # no error: routed to patch and global experts only
    fa.mkdir(parents=True)
    assert folder_module(first, data_dir=tmp_path / "data").component_root == fa


def test_segment_writes_where_training_reads(tmp_path):
    from src.modes.segment import output_folders

    source = own_images(tmp_path / "mine", normals=4, types={"bad": 1})
    cfg = compose_cfg(["mode=segment", "experiment=demo", "dataset=folder", f"dataset.source={source}",
                       f"paths.data_dir={tmp_path / 'data'}"])
    dm = instantiate(cfg.dataset)
    ((_, written),) = output_folders(cfg, dm).values()
    assert written == dm.sources["folder"].component_folder
    demo = compose_cfg(["mode=segment", "experiment=demo", f"paths.data_dir={tmp_path / 'data'}"])
    ((_, written),) = output_folders(demo, instantiate(demo.dataset)).values()
    assert written == tmp_path / "data" / "components" / "demo"  # the demo's true masks are kept


def test_prepare_reads_a_folder_in_place(tmp_path):
    from src.modes.prepare import run

    source = own_images(tmp_path / "mine", normals=5, types={"bad": 1})
    cfg = compose_cfg(["mode=prepare", "dataset=folder", f"dataset.source={source}", f"paths.output_dir={tmp_path / 'o'}"])
    run(cfg)
    assert sorted(p.name for p in source.iterdir()) == ["bad", "good"]


def test_sixteen_bit_images_load_in_a_folder(tmp_path):
    source = own_images(tmp_path / "mine", normals=4, types={"bad": 1})
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(source / "good" / "deep.png")
    dm = folder_module(source, "dataset.sources.folder.normal_test_fraction=0")
    dm.setup("fit")
    assert len(dm.train_set) == 5 and dm.train_set[4]["image"].shape == (3, 32, 32)


def test_a_truncated_png_is_found_before_training(tmp_path):
    source = own_images(tmp_path / "mine", normals=5, types={"bad": 1})
    path = source / "good" / "n02.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"good/n02.png: not a readable image \(.*[Tt]runcated"):
        folder_module(source).setup("fit")


def test_per_defect_type_image_metrics():
    import torch

    from src.evaluation.evaluator import ClassEvaluation
    from src.evaluation.report import build_report

    types = ["good", "good", "scratch", "stain", "stain"]
    result = ClassEvaluation(sample_index=torch.arange(5), labels=torch.tensor([0, 0, 1, 1, 1]),
                             image_scores=torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7]), routing_weights=torch.ones(5, 2))
    report = build_report({0: result}, ["folder/images"], defect_types=types)
    by_type = report["classes"]["folder/images"]["defect_types"]
    assert sorted(by_type) == ["scratch", "stain"]
    assert by_type["scratch"]["image_auroc"] == pytest.approx(1.0) and by_type["scratch"]["num_anomalous"] == 1
    assert by_type["stain"]["image_auroc"] == pytest.approx(0.75) and by_type["stain"]["num_anomalous"] == 2


@pytest.mark.slow
def test_demo_on_a_folder_of_good_and_bad_images_only(tmp_path, small_demo_root):
    """The demo experiment on a folder with good/ and bad/ only: image metrics, pixel metrics null with a note."""
    import json
    import shutil

    from tests.test_run import run_cli

    source = tmp_path / "mine"
    (source / "good").mkdir(parents=True)
    for path in sorted((small_demo_root / "fabric" / "train" / "good").glob("*.png")):
        shutil.copy(path, source / "good" / path.name)
    for folder in sorted((small_demo_root / "fabric" / "test").iterdir()):
        for path in sorted(folder.glob("*.png")):
            (source / "bad").mkdir(exist_ok=True)
            shutil.copy(path, source / "bad" / f"{folder.name}_{path.name}")
    out = tmp_path / "run"
    run_cli("experiment=demo", "dataset=folder", f"dataset.source={source}", "trainer.max_steps=4",
            "dataset.image_size=84", "dataset.resize=96", "dataset.batch_size=4", f"paths.output_dir={out}",
            f"paths.data_dir={tmp_path / 'data'}")
    result = json.loads((out / "results.json").read_text())["classes"]["folder/images"]
    assert isinstance(result["image_auroc"], float)
    assert all(result[m] is None for m in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"))
    assert any("no ground-truth masks" in note for note in result["notes"])
