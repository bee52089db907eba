"""Component masks for new images, computed by the run itself.

A model trained on ``mode=segment`` masks (route ``cluster``) carries, in its checkpoints, what it
takes to segment a new image of each of its classes exactly as its training and test images were
segmented: each class's part prototypes and kept slots, and the route's settings
(:class:`PartSegmentation`, from the segmentation cache). :class:`OnlineSegmenter` then

* chooses a new image's class when it is not given: the class whose part prototypes lie nearest
  to the image's features (mean squared distance of every feature vector to its nearest
  prototype), with the margin to the runner-up;
* segments the image with that class's prototypes, through the same functions as ``mode=segment``
  (:func:`src.segment.runner.load_for_segmentation`, ``ClusterSegmenter.segment``, the kept slots,
  :func:`src.segment.runner.resize_masks`), so its masks equal the cached ones bit for bit.

Backbone features are the model's own frozen encoder: the checkpoint's encoder is used when its
weights are the ones the cache was computed with (the cache records their fingerprint);
otherwise the images cannot be segmented and are scored without masks (``reason`` says why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data_modules.io import DEFAULT_MAX_PIXELS
from src.segment import cache
from src.segment.parts import Prototypes
from src.segment.refine import RefineSettings

log = logging.getLogger(__name__)


@dataclass
class ClassParts:
    prototypes: Prototypes
    kept: list[int]  # the part slots kept (the others are background or noise)


@dataclass
class PartSegmentation:
    """Everything needed to segment an image of each class like ``mode=segment`` did."""

    params: dict  # the cache manifest's parameters but k: route, image_size, features, refine, seed, ...
    classes: dict[str, ClassParts]  # class key ("<dataset>/<class>") -> its parts

    @property
    def route(self) -> str:
        return self.params.get("route", "?")

    def to_dict(self) -> dict:
        """Checkpoint form (tensors and plain values: loads with ``weights_only=True``)."""
        return {"params": self.params, "classes": {
            key: {"centres": torch.from_numpy(np.ascontiguousarray(p.prototypes.centres)),
                  "variance": p.prototypes.variance, "normalize": p.prototypes.normalize, "kept": list(p.kept)}
            for key, p in self.classes.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> PartSegmentation:
        classes = {key: ClassParts(Prototypes(v["centres"].numpy(), float(v["variance"]), bool(v["normalize"])),
                                   [int(k) for k in v["kept"]]) for key, v in data["classes"].items()}
        return cls(dict(data["params"]), classes)

    @classmethod
    def from_cache(cls, folders: dict[str, Path]) -> tuple[PartSegmentation | None, str]:
        """From the cache folders of each class key (``<component_masks>/<class>``): the part
        segmentation, or None and why (no cache, another route, settings that differ)."""
        params, classes = None, {}
        for key, folder in folders.items():
            manifest = cache.read_manifest(folder)
            arrays = cache.load_prototypes(folder)
            if manifest is None or arrays is None:
                return None, f"class {key} has no segmentation cache (manifest and prototypes) in {folder}"
            if manifest.get("route") != "cluster":
                return None, f"class {key} was segmented by route {manifest.get('route')!r}; new images can be " \
                             "segmented by route 'cluster' only"
            mine = {k: v for k, v in manifest["params"].items() if k != "k"}  # k may differ per class
            if params is not None and mine != params:
                return None, f"the classes were segmented with different settings ({key} differs)"
            params = mine
            classes[key] = ClassParts(Prototypes.from_arrays(arrays), list(manifest["parts"]["kept"]))
        if not classes:
            return None, "no classes"
        return cls(params, classes), ""


def _features(params: dict, encoder, device: str):
    """The dense features the cache was computed with, from the model's encoder when they are its
    own; (features, "") or (None, why not)."""
    from src.segment.features import BackboneFeatures, ColorFeatures

    described = params.get("features", {})
    if described.get("kind") == "color":
        return ColorFeatures(described["space"], int(described["stride"])), ""
    if described.get("kind") == "backbone":
        if encoder is None:
            return None, "the segmentation features are a backbone's and no encoder was given"
        features = BackboneFeatures(encoder, list(described["blocks"]), device)
        if features.describe() != described:  # name, blocks and the weights' fingerprint
            return None, ("the masks were computed with other backbone weights than this model's encoder "
                          "(segment.backbone differs from model.backbone)")
        return features, ""
    return None, f"unknown segmentation features {described!r}"


@dataclass
class ClassChoice:
    key: str  # the chosen class
    margin: float  # runner-up distance minus the chosen one (0 with one class); small: an uncertain choice
    distances: dict[str, float]  # per class: mean squared distance of the features to its nearest prototype


class OnlineSegmenter:
    """Segments new images like ``mode=segment`` segmented the training and test images."""

    def __init__(self, parts: PartSegmentation, encoder=None, device: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        from src.segment.cluster import ClusterSegmenter

        self.parts, self.max_pixels = parts, max_pixels
        features, self.reason = _features(parts.params, encoder, device)
        self.segmenter = None
        if features is not None:
            p = parts.params
            self.segmenter = ClusterSegmenter(features, float(p["coreset_ratio"]), RefineSettings(**p["refine"]),
                                              int(p["seed"]))
        self.image_size = int(parts.params["image_size"])

    @property
    def available(self) -> bool:
        return self.segmenter is not None

    def choose_class(self, grid: Tensor, candidates: list[str] | None = None) -> ClassChoice:
        """The class whose prototypes fit the (C, h, w) feature grid best."""
        vectors = grid.flatten(1).T  # (h*w, C)
        distances = {}
        for key in candidates or list(self.parts.classes):
            prototypes = self.parts.classes[key].prototypes
            centres = torch.from_numpy(prototypes.centres).to(vectors)
            d2 = torch.cdist(prototypes.prepare(vectors), centres) ** 2  # (h*w, k)
            distances[key] = float(d2.min(1).values.mean())
        ranked = sorted(distances, key=distances.get)
        margin = distances[ranked[1]] - distances[ranked[0]] if len(ranked) > 1 else 0.0
        return ClassChoice(ranked[0], margin, distances)

    @torch.inference_mode()
    def segment(self, path: Path, class_key: str | None = None,
                candidates: list[str] | None = None) -> tuple[np.ndarray, ClassChoice]:
        """(K, H, W) bool masks of the image file at its own resolution, and the class used
        (``class_key`` when given, else chosen among ``candidates``)."""
        from src.segment.runner import load_for_segmentation, resize_masks

        assert self.segmenter is not None, self.reason
        image, size = load_for_segmentation(path, self.image_size, self.max_pixels)
        grid = self.segmenter.features(image)
        if class_key is None:
            choice = self.choose_class(grid, candidates)
        else:
            choice = ClassChoice(class_key, 0.0, {})
        parts = self.parts.classes[choice.key]
        masks = self.segmenter.segment(parts.prototypes, image, grid=grid)
        return resize_masks(masks[parts.kept], size), choice

    def segment_missing(self, datamodule, folders: dict[str, Path], split: str = "test") -> int:
        """Compute the masks of the ``split`` images that a class's cache lacks (e.g. test images
        added after training) with this checkpoint's prototypes, into the cache (files and manifest
        entries, as ``mode=segment`` writes them). Only where the cache holds this checkpoint's
        segmentation (same settings and kept slots); returns the number of images segmented."""
        from data_modules.components import save_component_masks
        from src.segment.runner import cache_name, mask_file_name

        done = 0
        for key, folder in folders.items():
            parts = self.parts.classes.get(key)
            manifest = cache.read_manifest(folder)
            if parts is None or manifest is None:
                continue
            settings = {k: v for k, v in manifest["params"].items() if k != "k"}
            if settings != self.parts.params or list(manifest["parts"]["kept"]) != parts.kept:
                log.warning("%s: the masks in %s were computed with other settings than this checkpoint's; missing "
                            "masks are not computed", key, folder)
                continue
            entries = dict(manifest["images"])
            for sample in datamodule.list_samples(key, split):
                name, file = cache_name(sample), mask_file_name(sample)
                if (folder / file).is_file():
                    continue
                masks, _ = self.segment(sample.image_path, key)
                save_component_masks(folder / file, masks)
                entries[name] = {"sha1": cache.file_sha1(sample.image_path), "masks": file, "count": len(parts.kept)}
                done += 1
            if len(entries) != len(manifest["images"]):
                cache.write_manifest(folder, {**{k: v for k, v in manifest.items() if k != "format"}, "images": entries})
        return done

