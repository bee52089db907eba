"""Compute and cache the component masks of every image of a dataset, class by class."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from data_modules.components import component_path, read_component_masks, save_component_masks
from data_modules.io import DEFAULT_MAX_PIXELS, open_image
from data_modules.sources.base import Source
from data_modules.types import DataError, Sample
from src.segment import cache
from src.segment.parts import BackgroundRule, Prototypes

log = logging.getLogger(__name__)

SEGMENT_VERSION = 1  # bump when the algorithm changes: every cache entry becomes stale


class Segmenter(Protocol):
    route: str

    def describe(self) -> dict: ...

    def fit(self, images: list[Tensor], k: int) -> Prototypes: ...

    def segment(self, prototypes: Prototypes, image: Tensor) -> Tensor:
        """(k, H, W) bool slot masks of a (3, H, W) image in [0, 1]."""


@dataclass
class ClassReport:
    class_name: str
    images: int
    computed: int
    reused: int
    refit: str | None  # why the prototypes were fitted, None when reused
    kept: list[int]
    dropped: dict[int, str]
    seconds: float


@dataclass
class SegmentReport:
    output: Path
    classes: list[ClassReport] = field(default_factory=list)

    @property
    def computed(self) -> int:
        return sum(c.computed for c in self.classes)


def load_for_segmentation(path: Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Tensor, tuple[int, int]]:
    """(3, size, size) image in [0, 1] (square resize, like the data pipeline) and its (H, W)."""
    img = open_image(path, max_pixels=max_pixels)
    return TF.to_tensor(img.resize((size, size), Image.BILINEAR)), (img.height, img.width)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) bool -> (K, H, W) bool at the image's own resolution (nearest)."""
    if masks.shape[0] == 0:
        return np.zeros((0, *size), bool)
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0] > 0.5
    return masks.numpy()


def cache_name(sample: Sample) -> str:
    """The name of a sample in its class's cache manifest."""
    return f"{sample.split}/{sample.defect_type}/{sample.image_path.name}"


def mask_file_name(sample: Sample) -> str:
    """Its mask file, relative to the class's cache folder."""
    rel = component_path(Path(), sample.class_name, sample.split, sample.defect_type, sample.image_path.stem)
    return str(Path(*rel.parts[1:]))


def segment_class(
    segmenter: Segmenter,
    samples: Sequence[Sample],
    class_dir: Path,
    k: int,
    image_size: int,
    rule: BackgroundRule,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ClassReport:
    """Masks of one class's ``samples`` (training and test) into ``class_dir``, reusing what is
    current; images above ``max_pixels`` are refused."""
    start = time.perf_counter()
    class_name = samples[0].class_name
    train = [s for s in samples if s.split == "train"]
    if not train:
        raise DataError(f"class {class_name} has no training images to fit part prototypes on")
    files, seen = {}, {}
    for s in samples:
        rel = mask_file_name(s)
        if rel in seen:
            raise DataError(f"{s.image_path} and {seen[rel]} would share the mask file {class_dir / rel}: "
                            "rename one of them (image names must be unique up to the extension)")
        seen[rel], files[cache_name(s)] = s.image_path, rel
    hashes = {cache_name(s): cache.file_sha1(s.image_path) for s in samples}
    params = {"version": SEGMENT_VERSION, "route": segmenter.route, "k": k, "image_size": image_size,
              "background": vars(rule), **segmenter.describe()}
    key = cache.params_key(params)
    train_key = cache.params_key({cache_name(s): hashes[cache_name(s)] for s in train})

    manifest = cache.read_manifest(class_dir)
    arrays = cache.load_prototypes(class_dir)
    if manifest is None:
        refit = "no cache yet" if not (class_dir / cache.MANIFEST).exists() else "unreadable manifest"
    elif manifest.get("key") != key:
        changed = sorted(n for n in set(params) | set(manifest.get("params", {}))
                         if params.get(n) != manifest.get("params", {}).get(n))
        refit = f"parameters changed ({', '.join(changed)})"
    elif manifest.get("training_images") != train_key:
        refit = "training images changed"
    elif arrays is None:
        refit = "prototypes missing"
    else:
        refit = None

    train_masks: dict[str, Tensor] = {}
    if refit is not None:
        log.info("%s: fitting %d part prototypes on %d training images (%s)", class_name, k, len(train), refit)
        images = [load_for_segmentation(s.image_path, image_size, max_pixels)[0] for s in train]
        prototypes = segmenter.fit(images, k)
        for s, image in zip(train, images):
            train_masks[cache_name(s)] = segmenter.segment(prototypes, image)
        kept, dropped = rule.select([m.numpy() for m in train_masks.values()])
        entries = {rel: e for rel, e in (manifest or {}).get("images", {}).items() if rel not in hashes}  # to delete
        cache.save_prototypes(class_dir, prototypes.to_arrays())
    else:
        prototypes = Prototypes.from_arrays(arrays)
        kept = list(manifest["parts"]["kept"])
        dropped = {int(c): why for c, why in manifest["parts"]["dropped"].items()}
        entries = dict(manifest["images"])
    log.debug("%s: kept part slots %s of %d; dropped %s", class_name, kept, k, dropped or "none")

    computed = 0
    for s in samples:
        rel = cache_name(s)
        if refit is None and cache.entry_is_current(class_dir, entries.get(rel), hashes[rel]):
            continue
        masks = train_masks.get(rel)
        image, size = load_for_segmentation(s.image_path, image_size, max_pixels)
        if masks is None:
            masks = segmenter.segment(prototypes, image)
        save_component_masks(class_dir / files[rel], resize_masks(masks[kept], size))
        entries[rel] = {"sha1": hashes[rel], "masks": files[rel], "count": len(kept)}
        computed += 1
    for rel in sorted(set(entries) - set(hashes)):  # images that left the dataset
        gone = entries.pop(rel)["masks"]
        if gone not in files.values():  # not the file of a current image with the same stem
            (class_dir / gone).unlink(missing_ok=True)
    cache.write_manifest(class_dir, {
        "class": class_name, "route": segmenter.route, "key": key, "params": params,
        "training_images": train_key, "parts": {"k": k, "kept": kept, "dropped": {str(c): w for c, w in dropped.items()}},
        "images": entries,
    })
    return ClassReport(class_name, len(samples), computed, len(samples) - computed, refit, kept, dropped,
                       time.perf_counter() - start)


def segment_dataset(
    source: Source,
    segmenter: Segmenter,
    output: Path,
    k: int,
    k_per_class: dict[str, int] | None = None,
    image_size: int = 448,
    rule: BackgroundRule | None = None,
    splits: Sequence[str] = ("train", "test"),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> SegmentReport:
    """Masks of every image of ``source`` (every class, ``splits``) under ``output``."""
    k_per_class = dict(k_per_class or {})
    source.prepare_data()
    names = source.class_names()
    unknown = sorted(set(k_per_class) - set(names))
    if unknown:
        log.warning("segment.k_per_class names class(es) %s that this dataset does not have (classes: %s): ignored",
                    unknown, names)
    if "train" not in splits:
        raise ValueError(f"segment.splits={list(splits)} must include train: prototypes are fitted on it")
    report = SegmentReport(Path(output))
    for class_name in names:
        samples = [s for split in splits for s in source.list_samples(class_name, split)]
        with torch.inference_mode():
            result = segment_class(segmenter, samples, Path(output) / class_name, int(k_per_class.get(class_name, k)),
                                   image_size, rule or BackgroundRule(), max_pixels)
        report.classes.append(result)
        log.debug("%s: %d images, %d computed, %d from the cache, %.1f s", class_name, result.images,
                  result.computed, result.reused, result.seconds)
    return report


def part_iou(output: Path, truth: Path, source: Source, splits: Sequence[str] = ("train", "test")) -> dict:
    """Mean best-match IoU per class: for every true part present in an image, the best IoU
    with any produced mask of that image. Classes without true parts are reported with None."""
    result = {}
    for class_name in source.class_names():
        ious, masks_per_image, true_parts = [], [], 0
        for s in (s for split in splits for s in source.list_samples(class_name, split)):
            def read(root: Path) -> np.ndarray:
                return read_component_masks(component_path(root, s.class_name, s.split, s.defect_type, s.image_path.stem))
            true, pred = read(truth), read(output)
            masks_per_image.append(pred.shape[0])
            for t in true:
                if not t.any():
                    continue
                true_parts += 1
                inter = (pred & t).sum((1, 2)) if len(pred) else np.zeros(1)
                union = (pred | t).sum((1, 2)) if len(pred) else np.full(1, t.sum())
                ious.append(float((inter / np.maximum(union, 1)).max()))
        result[class_name] = {"iou": float(np.mean(ious)) if ious else None, "true_parts": true_parts,
                              "masks_per_image": float(np.mean(masks_per_image))}
    return result
