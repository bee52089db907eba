"""Run an exported AnomalyMoE model (``mode=export export.format=onnx``) without the training stack.

Depends on numpy, Pillow and onnxruntime only (no torch, Lightning, Hydra or timm): copy this file
next to ``model.onnx`` and ``model.json`` into an application::

    from inference import Detector
    result = Detector("model.onnx").predict(["a.png", "b.png"])
    result.scores, result.anomalous, result.classes, result.maps  # (B,), (B,), [B], (B, 256, 256)

The graph does everything from the resized image on (normalisation, class choice, component
masks, experts, calibration, decision: ``src/deploy.py``). This file does what a graph cannot do
exactly: decode the image (as ``data_modules.io.open_image``), resize it with PIL like the data
pipeline (square bilinear resize with antialiasing, centre crop) and, for a model with part
prototypes, resize it to the segmentation's working size and compute the nearest-neighbour index
maps that carry the masks to the model's input (``mode=predict``: masks at the image's own size,
then resized like the image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def open_rgb(path) -> Image.Image:
    """An image file as 8-bit RGB; 16-bit images scaled by 255 / 65535 (as the training pipeline)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in SIXTEEN_BIT_MODES:
            img = Image.fromarray(np.round(np.asarray(img, dtype=np.int64) * (255 / 65535)).astype(np.uint8))
        return img.convert("RGB")


def nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """(out_size,) source index of each output pixel of torch's ``nearest-exact`` resize (its CPU
    arithmetic: float32 scale, floor((i + 0.5) * scale))."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(((np.arange(out_size) + 0.5) * np.float64(scale)).astype(np.float32)).astype(np.int64)
    return np.minimum(src, in_size - 1)


def crop_offset(size: int, crop: int) -> int:
    return int(round((size - crop) / 2.0))  # torchvision's CenterCrop


def mask_index(image_side: int, segment_size: int, resize: int, crop: int | None) -> np.ndarray:
    """(S,) index into the segmentation grid of each model-input row (or column): masks at the
    segmentation size -> the image's side -> ``resize`` -> centre crop, all nearest (``mode=predict``)."""
    to_image = nearest_index(segment_size, image_side)  # image pixel -> segmentation pixel
    to_resized = nearest_index(image_side, resize)  # resized pixel -> image pixel
    start = crop_offset(resize, crop) if crop else 0
    return to_image[to_resized[start : start + (crop or resize)]]


@dataclass
class Predictions:
    scores: np.ndarray  # (B,) image scores
    anomalous: np.ndarray  # (B,) bool: score >= the class's threshold
    classes: list[str]  # class key of each image ("all": the classes' statistics pooled)
    class_margins: list[float | None]  # runner-up's distance minus the chosen class's (None: class given)
    thresholds: np.ndarray  # (B,)
    maps: np.ndarray  # (B, S, S) final anomaly maps (S: the scorer's evaluation size)
    routing_weights: np.ndarray  # (B, E) gate weights of the experts (names: Detector.experts)


class Detector:
    """An exported model: ``Detector("model.onnx")`` reads ``model.json`` beside it."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 info: dict | None = None) -> None:
        self.path = Path(path)
        self.info = info or json.loads(self.path.with_suffix(".json").read_text())
        if self.info.get("format") != "anomalymoe-onnx":
            raise ValueError(f"{self.path.with_suffix('.json')} does not describe an exported AnomalyMoE model")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=providers or ["CPUExecutionProvider"])
        pre = self.info["preprocessing"]
        self.resize, self.crop, self.segment_size = pre["resize"], pre["crop"], pre["segment_size"]
        self.class_keys: list[str] = self.info["class_keys"]
        self.experts: list[str] = self.info["experts"]

    def inputs(self, images: list, class_key: str | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for image files or PIL images."""
        images = [img.convert("RGB") if isinstance(img, Image.Image) else open_rgb(img) for img in images]
        batch = [np.asarray(img.resize((self.resize, self.resize), Image.BILINEAR)) for img in images]
        if self.crop:
            top = crop_offset(self.resize, self.crop)
            batch = [a[top : top + self.crop, top : top + self.crop] for a in batch]
        index = -1 if class_key is None else self.class_keys.index(class_key)
        feed = {"image": np.stack(batch).transpose(0, 3, 1, 2).copy(),
                "given_class": np.full(len(images), index, dtype=np.int64)}
        if self.segment_size:
            s = self.segment_size
            feed["segment_image"] = np.stack([np.asarray(img.resize((s, s), Image.BILINEAR)) for img in images]
                                             ).transpose(0, 3, 1, 2).copy()
            feed["mask_rows"] = np.stack([mask_index(img.height, s, self.resize, self.crop) for img in images])
            feed["mask_cols"] = np.stack([mask_index(img.width, s, self.resize, self.crop) for img in images])
        return feed

    def predict(self, images: list, class_key: str | None = None) -> Predictions:
        """Score image files or PIL images; ``class_key``: the class of all of them (None: each
        image's class is chosen by the part prototypes, or the only class, or all pooled)."""
        out = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, self.inputs(images, class_key))))
        keys = [*self.class_keys, "all"]
        margins = []
        for distances in out["class_distance"]:
            ranked = np.sort(distances)
            chosen = class_key is None and self.segment_size is not None
            margins.append(float(ranked[1] - ranked[0]) if chosen and len(ranked) > 1 else (0.0 if chosen else None))
        return Predictions(out["score"], out["anomalous"], [keys[i] for i in out["class_index"]], margins,
                           out["threshold"], out["anomaly_map"][:, 0], out["routing_weights"])
