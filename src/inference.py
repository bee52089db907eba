"""Run an exported AnomalyMoE model (``mode=export``) without the training stack.

``model.onnx`` (``export.format=onnx``) needs numpy, Pillow and onnxruntime only (no torch,
Lightning, Hydra or timm); ``model.pt2`` (``export.format=torch``) needs numpy, Pillow and torch.
Copy this file next to the model and its ``model.json`` into an application::

    from inference import Detector
    result = Detector("model.onnx").predict(["a.png", "b.png"])
    result.scores, result.anomalous, result.classes, result.maps  # (B,), (B,), [B], (B, 256, 256)

The graph does everything from the resized image on (normalisation, class choice, component
masks, experts, calibration, decision: ``src/deploy.py``). This file does what a graph cannot do
exactly: decode the image (as ``data_modules.io.open_image``: upright by its EXIF orientation,
16-bit scaled, the same checks), resize it with PIL like the data pipeline (square bilinear resize
with antialiasing, centre crop) and, for a model with part prototypes, resize it to the
segmentation's working size and compute the nearest-neighbour index maps that carry the masks to
the model's input (``mode=predict``: masks at the image's own size, then resized like the image).
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUFFIXES = {".onnx": "onnx", ".pt2": "torch"}  # exported file -> the runtime that runs it
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
MAX_IMAGE_PIXELS = 89_478_485  # images above this are refused, as by the data pipeline (dataset.max_image_pixels)


def is_exported(path) -> bool:
    """``path`` names an exported model (by its suffix)."""
    return bool(path) and Path(str(path)).suffix in SUFFIXES


class ImageError(ValueError):
    """An image that cannot be scored; the message names the file and what to do."""


def open_rgb(path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file as 8-bit RGB, upright (its EXIF orientation applied); 16-bit images scaled by
    255 / 65535 (as the training pipeline). A missing, unreadable, float or too large image is an
    :class:`ImageError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"image {path} is {img.width}x{img.height} ({img.width * img.height / 1e6:.1f} MP), "
                                 f"above the limit of {max_pixels} pixels: downscale it, or raise max_pixels")
            if img.mode == "F":
                raise ImageError(f"image {path} holds 32-bit floats (mode F), whose value range is not defined: "
                                 "save it as an 8-bit or 16-bit image")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode in SIXTEEN_BIT_MODES:
                array = np.asarray(img, dtype=np.int64)
                if array.min() < 0 or array.max() > 65535:
                    raise ImageError(f"image {path} holds 32-bit values outside 0..65535 ({array.min()}..{array.max()}): "
                                     "save it as an 8-bit or 16-bit image")
                img = Image.fromarray(np.round(array * (255 / 65535)).astype(np.uint8))
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {path} is too large ({err}): downscale it") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"cannot read image {path}: {err}. Replace or remove the file.") from err


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


def graph_inputs(images: list[Image.Image], resize: int, crop: int | None, segment_size: int | None,
                 class_index: int = -1) -> dict[str, np.ndarray]:
    """The graph's inputs for RGB images: ``image`` (B, 3, S, S) uint8 (PIL bilinear resize to
    ``resize``, centre crop to ``crop``), ``given_class`` (B,) and, with part prototypes
    (``segment_size``), ``segment_image``, ``mask_rows`` and ``mask_cols``."""
    batch = [np.asarray(img.resize((resize, resize), Image.BILINEAR)) for img in images]
    if crop:
        top = crop_offset(resize, crop)
        batch = [a[top : top + crop, top : top + crop] for a in batch]
    feed = {"image": np.stack(batch).transpose(0, 3, 1, 2).copy(),
            "given_class": np.full(len(images), class_index, dtype=np.int64)}
    if segment_size:
        s = segment_size
        feed["segment_image"] = np.stack([np.asarray(img.resize((s, s), Image.BILINEAR)) for img in images]
                                         ).transpose(0, 3, 1, 2).copy()
        feed["mask_rows"] = np.stack([mask_index(img.height, s, resize, crop) for img in images])
        feed["mask_cols"] = np.stack([mask_index(img.width, s, resize, crop) for img in images])
    return feed


@dataclass
class Predictions:
    scores: np.ndarray  # (B,) image scores
    anomalous: np.ndarray  # (B,) bool: score >= the class's threshold
    classes: list[str]  # class key of each image ("all": the classes' statistics pooled)
    class_margins: list[float | None]  # runner-up's distance minus the chosen class's (None: class given)
    thresholds: np.ndarray  # (B,)
    maps: np.ndarray  # (B, S, S) final anomaly maps (S: the scorer's evaluation size)
    routing_weights: np.ndarray  # (B, E) gate weights of the experts (names: Detector.experts)


def onnx_runner(path: Path, providers: list[str] | None, threads: int | None) -> Callable[[dict], dict]:
    """Feed -> outputs by name, with onnxruntime (weights above 1 GiB lie in ``<file>.data`` beside it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the graph optimiser warns once per CastLike node it cannot fold
    if threads:
        options.intra_op_num_threads = threads
    requested = providers or ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=requested)
    dropped = [p for p in (p if isinstance(p, str) else p[0] for p in requested) if p not in session.get_providers()]
    if dropped:  # onnxruntime falls back to the others (its own log of why is at warning level, silenced above)
        warnings.warn(f"{path} runs on {session.get_providers()} without the requested {dropped} (available here: "
                      f"{ort.get_available_providers()})", stacklevel=3)
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


def torch_runner(path: Path, inputs: list[str], outputs: list[str], threads: int | None) -> Callable[[dict], dict]:
    """Feed -> outputs by name, with the program of ``torch.export``. The file is read as data:
    tensors only (``torch.load(weights_only=True)``); one holding pickled objects is refused."""
    import torch

    with zipfile.ZipFile(path) as archive:
        objects = [n for n in archive.namelist() if "/constants/" in n and not (
            n.rsplit("/", 1)[-1].startswith("tensor_") or n.endswith(".json"))]
    if objects:
        raise ValueError(f"{path} holds objects other than tensors ({objects[:3]}): not a model written by mode=export")
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # torch.export.load would otherwise fall back to unpickling
    try:
        program = torch.export.load(str(path)).module()
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
    if threads:
        torch.set_num_threads(threads)

    def run(feed: dict) -> dict:
        with torch.inference_mode():
            out = program(*[torch.from_numpy(feed[name]) for name in inputs])
        return {name: value.numpy() for name, value in zip(outputs, out)}

    return run


class Detector:
    """An exported model: ``Detector("model.onnx")`` or ``Detector("model.pt2")`` reads
    ``model.json`` beside it. ``threads``: the runtime's threads (None: its default);
    ``providers``: onnxruntime's execution providers (default: the CPU)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 info: dict | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.path = Path(path)
        runtime = SUFFIXES.get(self.path.suffix)
        if runtime is None:
            raise ValueError(f"{self.path}: an exported model is a {' or '.join(SUFFIXES)} file (mode=export)")
        description = self.path.with_suffix(".json")
        if info is None and not description.is_file():
            raise FileNotFoundError(f"{description} not found: copy the model.json written with {self.path.name}")
        self.info = info or json.loads(description.read_text())
        if self.info.get("format") != f"anomalymoe-{runtime}":
            raise ValueError(f"{description} does not describe an exported AnomalyMoE {runtime} model "
                             f"(format {self.info.get('format')!r}): use the model.json written with {self.path.name}")
        outputs = [o.split()[0] for o in self.info["outputs"]]
        self.run = (onnx_runner(self.path, providers, threads) if runtime == "onnx"
                    else torch_runner(self.path, self.info["inputs"], outputs, threads))
        pre = self.info["preprocessing"]
        self.resize, self.crop, self.segment_size = pre["resize"], pre["crop"], pre["segment_size"]
        self.class_keys: list[str] = self.info["class_keys"]
        self.experts: list[str] = self.info["experts"]
        self.max_pixels = max_pixels

    def inputs(self, images: list, class_key: str | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for image files or PIL images."""
        images = [img.convert("RGB") if isinstance(img, Image.Image) else open_rgb(img, self.max_pixels)
                  for img in images]
        index = -1 if class_key is None else self.class_keys.index(class_key)
        return graph_inputs(images, self.resize, self.crop, self.segment_size, index)

    def predict(self, images: list, class_key: str | None = None) -> Predictions:
        """Score image files or PIL images; ``class_key``: the class of all of them (None: each
        image's class is chosen by the part prototypes, or the only class, or all pooled)."""
        if class_key is not None and class_key not in self.class_keys:
            raise ValueError(f"class_key={class_key!r}: the model holds {self.class_keys}")
        out = self.run(self.inputs(images, class_key))
        keys = [*self.class_keys, "all"]
        margins = []
        for distances in out["class_distance"]:
            ranked = np.sort(distances)
            chosen = class_key is None and self.segment_size is not None
            margins.append(float(ranked[1] - ranked[0]) if chosen and len(ranked) > 1 else (0.0 if chosen else None))
        return Predictions(out["score"], out["anomalous"], [keys[i] for i in out["class_index"]], margins,
                           out["threshold"], out["anomaly_map"][:, 0], out["routing_weights"])
