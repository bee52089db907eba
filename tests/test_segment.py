"""mode=segment: the cluster and sam routes, the cache, and component masks in training."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from data_modules.components import component_path, read_component_masks
from data_modules.datamodule import AnomalyDataModule
from data_modules.dataset import collate_samples
from data_modules.types import DataError
from src.segment.cluster import ClusterSegmenter
from src.segment.features import BackboneFeatures, ColorFeatures
from src.segment.refine import RefineSettings
from src.segment.runner import segment_dataset
from tests.conftest import compose_cfg, small_demo_overrides, tiny_backbone

GENERATE = dict(generate_size=96, num_train=8, num_test_good=4, num_test_defect=2)


def demo_module(root: Path, masks: Path | None = None) -> AnomalyDataModule:
    """The data module of a run on the small demo (what ``dataset=demo`` builds)."""
    demo = dict(kind="demo", root=str(root), component_masks=str(masks) if masks else None, **GENERATE)
    return AnomalyDataModule({"demo": demo}, image_size=84, resize=96, num_workers=0)


def run_segment_mode(overrides: list[str]) -> tuple[float | None, str]:
    from src.modes.segment import run

    cfg = compose_cfg(overrides)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        value = run(cfg)
    return value, out.getvalue()


@pytest.fixture(scope="module")
def color_cache(small_demo_root, tmp_path_factory) -> tuple[Path, float | None, str]:
    """The small demo segmented by `mode=segment` with colour features."""
    tmp = tmp_path_factory.mktemp("segment")
    value, printed = run_segment_mode([
        *small_demo_overrides(small_demo_root), "mode=segment", "segment.features=color", "segment.image_size=96",
        "segment.refine.iterations=2", f"segment.output={tmp / 'masks'}", f"paths.output_dir={tmp / 'run'}",
        f"segment.truth={small_demo_root / 'components_true'}",
    ])
    return tmp / "masks", value, printed


def test_demo_masks_match_the_true_parts(color_cache, small_demo_root):
    output, value, printed = color_cache
    assert "| widget | 20 | 20 | 0 | 3 | 1 |" in printed and "mean best-match IoU" in printed
    assert value is not None and value >= 0.6, printed
    manifest = json.loads((output / "widget" / "manifest.json").read_text())
    assert manifest["route"] == "cluster" and manifest["parts"]["k"] == 4 and len(manifest["parts"]["kept"]) == 3
    assert len(manifest["images"]) == 20 and all(len(e["sha1"]) == 40 for e in manifest["images"].values())
    fabric = json.loads((output / "fabric" / "manifest.json").read_text())["parts"]
    assert len(fabric["kept"]) + len(fabric["dropped"]) == 5 and any("background" in w for w in fabric["dropped"].values())
    masks = read_component_masks(component_path(output, "widget", "test", "crack", "000"))
    assert masks.shape == (3, 96, 96) and masks.any((1, 2)).all()


def test_component_experts_train_on_segment_masks(color_cache, small_demo_root):
    """Masks from the cache -> one training step -> every component expert gets a gradient;
    the component map of test images with masks is non-zero."""
    output = color_cache[0]
    cfg = compose_cfg([*small_demo_overrides(small_demo_root), f"dataset.component_masks={output}", "seed=0"])
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    datamodule.setup("test")
    torch.manual_seed(0)
    module = instantiate(cfg.module, net=instantiate(cfg.model))
    widget = [i for i, s in enumerate(datamodule.train_set.samples) if s.class_name == "widget"][:4]
    batch = collate_samples([datamodule.train_set[i] for i in widget])
    assert batch["masks"].shape[1] == 3 and (batch["num_masks"] == 3).all()
    module.net.train()
    out = module.net.forward_train(batch["image"], batch["image_ae"], batch["masks"], batch["num_masks"])
    terms = module.objective(out)
    terms.loss.backward()
    assert terms.component > 0
    for expert in module.net.component_experts:
        grads = [p.grad for p in expert.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    module.net.eval()
    test = [i for i, s in enumerate(datamodule.test_set.samples) if s.class_name == "widget"][:4]
    batch = collate_samples([datamodule.test_set[i] for i in test])
    with torch.no_grad():
        pred = module.net(batch["image"], batch["image_ae"], batch["masks"], batch["num_masks"])
    assert (pred.map_component.flatten(1).abs().amax(1) > 0).all()


def test_training_refuses_to_start_without_component_masks(tmp_path):
    from src.modes.train import run

    base = ["dataset=mvtec_ad", f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"]
    cfg = compose_cfg(base)
    with pytest.raises(DataError, match=r"dataset 'mvtec_ad' not found.*Download"):  # no data: said first
        run(cfg)
    from tests.test_datasets import fake_mvtec_ad

    fake_mvtec_ad(tmp_path / "mvtec_ad")
    assert cfg.dataset.sources.mvtec_ad.component_masks == str(tmp_path / "components" / "mvtec_ad")  # the segment cache
    with pytest.raises(DataError, match=r"does not exist.*mode=segment dataset=mvtec_ad.*num_component_experts=0"):
        run(cfg)
    with pytest.raises(DataError, match=r"is null.*mode=segment.*num_component_experts=0"):
        run(compose_cfg([*base, "dataset.component_masks=null"]))
    from src.build import require_component_masks

    require_component_masks(compose_cfg([*base, "model.num_component_experts=0"]))  # no error


def _touch_image(path: Path) -> None:
    Image.fromarray(np.asarray(Image.open(path))[::-1].copy()).save(path)


def test_cache_skips_current_images_and_recomputes_changes(small_demo_root, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(small_demo_root, root)
    datamodule = demo_module(root)
    torch.manual_seed(0)
    segmenter = ClusterSegmenter(BackboneFeatures(tiny_backbone(), [2, 3]), coreset_ratio=0.2,
                                 refine_settings=RefineSettings(iterations=2))
    out = tmp_path / "masks"

    def run(**kwargs):
        start = time.process_time()  # CPU time: steadier than wall time on a shared machine
        report = segment_dataset(datamodule.sources["demo"], segmenter, out, k=3, image_size=140, **kwargs)
        return report, time.process_time() - start

    first, t_first = run()
    assert first.computed == 36 and all(c.refit == "no cache yet" for c in first.classes)
    (second, t_second), (third, t_third) = run(), run()
    assert second.computed == third.computed == 0 and all(c.refit is None for c in second.classes)
    assert t_first >= 10 * min(t_second, t_third), (t_first, t_second, t_third)

    changed, _ = run(k_per_class={"widget": 4})  # a parameter of one class: that class only
    widget, fabric = {c.class_name: c for c in changed.classes}["widget"], {c.class_name: c for c in changed.classes}["fabric"]
    assert widget.computed == 20 and "parameters changed (k)" in widget.refit and fabric.computed == 0

    _touch_image(root / "widget" / "test" / "crack" / "001.png")  # a test image: that image only
    (out / "widget" / "test" / "good" / "000.npz").write_bytes(b"not an npz")  # unreadable: recomputed
    (out / "widget" / "test" / "good" / "001.npz").unlink()  # missing: recomputed
    again, _ = run(k_per_class={"widget": 4})
    assert {c.class_name: c.computed for c in again.classes} == {"fabric": 0, "widget": 3}
    assert read_component_masks(out / "widget" / "test" / "good" / "000.npz").shape[0] == widget.kept.__len__()

    _touch_image(root / "fabric" / "train" / "good" / "002.png")  # a training image: the class is refitted
    refit, _ = run(k_per_class={"widget": 4})
    assert {c.class_name: c.refit for c in refit.classes} == {"fabric": "training images changed", "widget": None}

    # The data module reads the cache; an image without its file is an error, never empty masks.
    datamodule = demo_module(root, out)
    datamodule.setup("fit")
    item = datamodule.train_set[[s.class_name for s in datamodule.train_set.samples].index("widget")]
    assert item["masks"].shape == (len(widget.kept), 84, 84)
    (out / "widget" / "train" / "good" / "000.npz").unlink()
    with pytest.raises(DataError, match="mode=segment"):
        datamodule.train_set[[s.image_path.name for s in datamodule.train_set.samples].index("000.png") + 8]


def test_color_features_are_lab_cells():
    image = torch.zeros(3, 8, 8)
    image[0] = 1.0  # pure red: L ~ 53, a ~ 80, b ~ 67
    lab = ColorFeatures("lab", stride=4)(image)
    assert lab.shape == (3, 2, 2)
    assert torch.allclose(lab[:, 0, 0], torch.tensor([53.24, 80.09, 67.20]), atol=0.5)


def tiny_sam_checkpoint(path: Path) -> Path:
    from src.segment.sam import build_sam

    torch.manual_seed(0)
    torch.save(build_sam("vit_b", TINY_SAM).state_dict(), path)
    return path


TINY_SAM = dict(embed_dim=16, depth=1, num_heads=1, global_attn_indexes=[0], image_size=64, prompt_embed_dim=16,
                window_size=4)


def test_sam_route_with_a_tiny_random_sam(small_demo_root, tmp_path):
    from src.modes.segment import build_segmenter
    from src.segment.parts import Prototypes

    checkpoint = tiny_sam_checkpoint(tmp_path / "tiny_sam.pth")
    arch = "{" + ",".join(f"{k}:{v}".replace(" ", "") for k, v in TINY_SAM.items()) + "}"
    overrides = [
        *small_demo_overrides(small_demo_root), "mode=segment", "segment=sam", f"segment.sam_checkpoint={checkpoint}",
        f"segment.sam_arch={arch}", "segment.points_per_side=3", "segment.pred_iou_thresh=0",
        "segment.stability_score_thresh=0", "segment.box_nms_thresh=1.0", "segment.min_mask_area=0.01",
        "segment.features=color", "segment.image_size=96", "segment.k=3", "segment.k_per_class=null",
        "dataset.classes=[widget]", f"segment.output={tmp_path / 'masks'}", f"paths.output_dir={tmp_path / 'run'}",
        "segment.background.border_share=1.01", "segment.background.min_area=0",  # keep every slot of the random SAM
    ]
    _, printed = run_segment_mode(overrides)
    assert "| widget | 20 | 20 | 0 | 3 | 0 |" in printed, printed
    class_dir = tmp_path / "masks" / "widget"
    manifest = json.loads((class_dir / "manifest.json").read_text())
    assert manifest["route"] == "sam" and manifest["params"]["sam"]["points_per_side"] == 3
    counts = {read_component_masks(class_dir / e["masks"]).shape for e in manifest["images"].values()}
    assert counts == {(3, 96, 96)}  # the same slots in every image, at the image's size
    # Slot consistency: each stored slot is the union of the proposals nearest to its prototype.
    segmenter = build_segmenter(compose_cfg(overrides).segment)
    with np.load(class_dir / "prototypes.npz") as arrays:
        prototypes = Prototypes.from_arrays(arrays)
    from src.segment.runner import load_for_segmentation

    image, _ = load_for_segmentation(small_demo_root / "widget" / "test" / "extra" / "000.png", 96)
    masks, vectors = segmenter.proposals(image)
    slots = prototypes.scores(vectors).argmax(1)
    stored = read_component_masks(class_dir / "test" / "extra" / "000.npz")
    for slot in range(3):
        expected = masks[(slots == slot).numpy()].any(0) if (slots == slot).any() else np.zeros((96, 96), bool)
        assert np.array_equal(stored[slot], expected)
    _, again = run_segment_mode(overrides)
    assert "| widget | 20 | 0 | 20 |" in again


def test_sam_checkpoint_errors_say_where_to_get_one(tmp_path):
    from src.segment.sam import load_sam

    with pytest.raises(ValueError, match="segment.sam_checkpoint=.*github.com/facebookresearch/segment-anything"):
        load_sam(None)
    with pytest.raises(FileNotFoundError, match="absent.pth does not exist.*model-checkpoints"):
        load_sam(str(tmp_path / "absent.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit a vit_b SAM"):
        load_sam(str(bad), "vit_b", TINY_SAM)


@pytest.mark.slow
def test_segment_then_train_from_the_command_line(small_demo_root, tmp_path):
    """`mode=segment` then `mode=train` on its cache: the component loss is non-zero."""
    import csv

    from tests.test_run import run_cli

    masks = tmp_path / "masks"
    common = small_demo_overrides(small_demo_root)
    proc = run_cli(*common, "mode=segment", f"segment.output={masks}", "segment.features=color", "segment.image_size=96",
                   f"paths.output_dir={tmp_path / 'segment'}")
    assert "| widget | 20 | 20 | 0 | 3 | 1 |" in proc.stdout
    run_cli(*common, f"dataset.component_masks={masks}", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
            "dataset.batch_size=8", "test_after_training=false", f"paths.output_dir={tmp_path / 'train'}")
    rows = list(csv.DictReader(open(tmp_path / "train" / "csv" / "metrics.csv")))
    assert any(float(r["train/component"] or 0) > 0 for r in rows)


def test_every_image_extension_is_segmented(tmp_path):
    """Test images in any extension get masks (the original globbed test folders for *.png only)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i, (split, kind, name) in enumerate([("train", "good", "000.png"), ("train", "good", "001.JPG"),
                                             ("test", "good", "002.JPG"), ("test", "good", "003.jpeg")]):
        img = np.full((32, 32, 3), 200, np.uint8)
        img[8:24, 8:24] = (200, 30, 30)  # a red part on a grey board
        img = np.clip(img + rng.integers(-5, 5, img.shape), 0, 255).astype(np.uint8)
        (root / "part" / split / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "part" / split / kind / name, quality=95)
    datamodule = AnomalyDataModule({"jpegs": {"kind": "mvtec_ad", "root": str(root)}}, image_size=28, resize=32,
                                   num_workers=0)
    segmenter = ClusterSegmenter(ColorFeatures(stride=2), coreset_ratio=1.0, refine_settings=RefineSettings(iterations=1))
    report = segment_dataset(datamodule.sources["jpegs"], segmenter, tmp_path / "masks", k=2, image_size=32)
    assert report.computed == 4 and report.classes[0].kept == [next(iter(set(range(2)) - set(report.classes[0].dropped)))]
    for split, name in [("train", "001"), ("test", "002"), ("test", "003")]:
        masks = read_component_masks(tmp_path / "masks" / "part" / split / "good" / f"{name}.npz")
        assert masks.shape == (1, 32, 32) and masks[0, 10:22, 10:22].all() and not masks[0, :4].any()
