"""Seconds per image of ``mode=predict`` at batch 1 on the CPU, without and with component masks
computed on the fly (the image's class chosen by the part prototypes, then segmented like
``mode=segment``), for the demo model and the paper-size model (random weights: timing does not
depend on them).

Each measurement is predict's own per-image work: read and preprocess the image
(:class:`src.modes.predict.ImageFiles`, with or without the :class:`~src.segment.online.OnlineSegmenter`),
the model's forward pass (:meth:`src.module.AnomalyMoEModule.infer`) and the scoring
(:class:`src.evaluation.scorer.Scorer`); heat-map rendering and file writing are left out. The
prototypes are fitted on a few demo training images per class with the model's encoder.

    python benchmarks/predict_speed.py                       # demo and paper, 6 images each
    python benchmarks/predict_speed.py --models demo --images 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from data_modules.sources.demo import generate_demo_dataset
from src.evaluation.calibration import NormalStatistics
from src.modes.predict import ImageFiles, collate
from src.modes.segment import build_segmenter
from src.segment.online import ClassParts, OnlineSegmenter, PartSegmentation
from src.segment.parts import BackgroundRule
from src.segment.runner import SEGMENT_VERSION, load_for_segmentation

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "demo": ["experiment=demo", "mode=segment"],
    "paper": ["model.backbone.weights=random", "mode=segment", "dataset.image_size=392", "dataset.resize=448"],
}


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def part_segmentation(cfg, encoder, images: dict[str, list[Path]]) -> PartSegmentation:
    """Prototypes per class fitted on ``images`` with the model's encoder (mode=segment's route)."""
    segmenter = build_segmenter(cfg.segment, encoder)
    size = int(cfg.segment.image_size)
    rule = BackgroundRule(**OmegaConf.to_container(cfg.segment.background, resolve=True))
    classes = {}
    for key, paths in images.items():
        loaded = [load_for_segmentation(p, size)[0] for p in paths]
        prototypes = segmenter.fit(loaded, int(cfg.segment.k))
        kept, _ = rule.select([segmenter.segment(prototypes, image).numpy() for image in loaded])
        classes[key] = ClassParts(prototypes, kept)
    params = {"version": SEGMENT_VERSION, "route": "cluster", "image_size": size,
              "background": vars(rule), **segmenter.describe()}
    return PartSegmentation(params, classes)


def seconds_per_image(module, dataset: ImageFiles, stats: NormalStatistics) -> float:
    """Median seconds of one image's predict work after one warm-up image."""
    times = []
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate)
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)  # reads, preprocesses (and segments) the image
        except StopIteration:
            break
        (_, prediction), = module.infer([batch])
        module.evaluator.scorer.score(prediction, stats)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(name: str, num_images: int, data: Path) -> dict:
    cfg = compose_config(MODELS[name])
    torch.manual_seed(0)
    module = instantiate(cfg.module, net=instantiate(cfg.model)).eval()
    encoder = module.net.encoder
    train = {f"demo/{c}": sorted((data / c / "train" / "good").glob("*.png"))[:4] for c in ("widget", "fabric")}
    start = time.perf_counter()
    parts = part_segmentation(cfg, encoder, train)
    fit_seconds = time.perf_counter() - start
    tests = sorted((data / "widget" / "test").rglob("*.png"))[: num_images // 2 + 1]
    tests += sorted((data / "fabric" / "test").rglob("*.png"))[: num_images // 2]
    transforms = instantiate(cfg.dataset).transforms
    stats = NormalStatistics([0.0] * 3, [1.0] * 3, 0.5, 1, 0.0, 0.0)
    segmenter = OnlineSegmenter(parts, encoder)
    assert segmenter.available, segmenter.reason
    plain = seconds_per_image(module, ImageFiles(tests, transforms, data), stats)
    online = seconds_per_image(module, ImageFiles(tests, transforms, data, segmenter=segmenter), stats)
    return {"model": name, "image_size": int(cfg.dataset.image_size), "segment_size": int(cfg.segment.image_size),
            "without_masks": plain, "with_online_masks": online, "images": len(tests) - 1,
            "prototype_fit_seconds": fit_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=6, help="test images timed per model (after one warm-up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        generate_demo_dataset(data, seed=0, size=192, num_train=4, num_test_good=4, num_test_defect=1)
        rows = [measure(m, args.images, data) for m in args.models]
    print(f"\nmode=predict per image, batch 1, CPU ({torch.get_num_threads()} threads)\n")
    print("| model | input px | segmentation px | s/image without masks | s/image with masks computed | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['image_size']} | {r['segment_size']} | {r['without_masks']:.3f} | "
              f"{r['with_online_masks']:.3f} | {r['with_online_masks'] / r['without_masks']:.2f}x |")


if __name__ == "__main__":
    main()
