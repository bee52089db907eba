"""Run an exported AnomalyMoE model (``mode=export``) without the training stack.

``model.onnx`` (``export.format=onnx``) needs numpy, Pillow and onnxruntime only (no torch,
Lightning, Hydra or timm). Copy this file next to the model and its ``model.json`` into an
application::

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

The files are read as data. ``model.json`` and the graph are tied together: ``model.json`` holds
the SHA-256 of each graph file (``graph_sha256``), the graph holds the SHA-256 of ``model.json``
(its metadata :data:`DESCRIPTION_DIGEST`, over every field but ``graph_sha256`` and ``parity``);
a file that is damaged, edited or from another export is refused before any image is scored
(:class:`ModelFileError`, naming the file and the fix). A ``model.pt2`` (``torch.export``) is
refused: torch cannot load one without running code stored in it (it unpickles constants,
evaluates shape expressions with sympy and guards as Python).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUFFIXES = {".onnx": "onnx"}  # exported file -> the runtime that runs it
REFUSED = {".pt2": "a torch.export program cannot be opened without running code stored in the file (torch unpickles "
                   "its constants, evaluates its shape expressions with sympy and its guards as Python), so it is "
                   "not opened: export the checkpoint with mode=export export.format=onnx and use model.onnx"}
DESCRIPTION_DIGEST = "anomalymoe.model_json_sha256"  # the graph's metadata key: the digest of its model.json
UNSIGNED = ("graph_sha256", "parity")  # fields of model.json outside that digest (written after the graph)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
MAX_IMAGE_PIXELS = 89_478_485  # images above this are refused, as by the data pipeline (dataset.max_image_pixels)


def is_exported(path) -> bool:
    """``path`` names an exported model (by its suffix)."""
    return bool(path) and Path(str(path)).suffix in (*SUFFIXES, *REFUSED)


class ImageError(ValueError):
    """An image that cannot be scored; the message names the file and what to do."""


class ModelFileError(ValueError):
    """An exported model or its ``model.json`` that cannot be used; the message names the file and the fix."""


def description_digest(info: dict) -> str:
    """SHA-256 of ``model.json``'s fields (all but :data:`UNSIGNED`), as JSON with sorted keys."""
    signed = {k: v for k, v in info.items() if k not in UNSIGNED}
    return hashlib.sha256(json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_rgb(path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file as 8-bit RGB (:func:`decode_rgb`). A missing or unreadable file is an
    :class:`ImageError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
    try:
        with Image.open(path) as img:
            return decode_rgb(img, f"image {path}", max_pixels)
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {path} is too large ({err}): downscale it") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"cannot read image {path}: {err}. Replace or remove the file.") from err


def decode_rgb(img: Image.Image, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An opened image as 8-bit RGB, upright (its EXIF orientation applied); 16-bit images scaled
    by 255 / 65535 (as the training pipeline); ``img`` itself is left as it is. A float or too
    large image is an :class:`ImageError` naming ``name``."""
    if img.width * img.height > max_pixels:
        raise ImageError(f"{name} is {img.width}x{img.height} ({img.width * img.height / 1e6:.1f} MP), "
                         f"above the limit of {max_pixels} pixels: downscale it, or raise max_pixels")
    if img.mode == "F":
        raise ImageError(f"{name} holds 32-bit floats (mode F), whose value range is not defined: "
                         "save it as an 8-bit or 16-bit image")
    img.load()
    img = ImageOps.exif_transpose(img)  # a copy: the caller's image keeps its orientation
    if img.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(img, dtype=np.int64)
        if array.min() < 0 or array.max() > 65535:
            raise ImageError(f"{name} holds 32-bit values outside 0..65535 ({array.min()}..{array.max()}): "
                             "save it as an 8-bit or 16-bit image")
        img = Image.fromarray(np.round(array * (255 / 65535)).astype(np.uint8))
    return img.convert("RGB")


def as_rgb(image, index: int, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """One input of :meth:`Detector.predict` as 8-bit RGB, by the rules of an image file
    (:func:`decode_rgb`): a path, a PIL image, or a numpy array (H, W) or (H, W, 3 or 4) of
    uint8, or (H, W) of uint16 (16-bit, scaled by 255 / 65535)."""
    if isinstance(image, Image.Image):
        return decode_rgb(image, f"image {index} ({image.mode} PIL image)", max_pixels)
    if isinstance(image, np.ndarray):
        name = f"image {index} (array {image.shape} {image.dtype})"
        if not (image.dtype == np.uint8 and (image.ndim == 2 or image.ndim == 3 and image.shape[2] in (3, 4))
                or image.dtype == np.uint16 and image.ndim == 2):
            raise ImageError(f"{name}: give uint8 (H, W), (H, W, 3) or (H, W, 4), or uint16 (H, W) (16-bit grey); "
                             "floats have no defined value range: scale them to uint8 or uint16")
        return decode_rgb(Image.fromarray(np.ascontiguousarray(image)), name, max_pixels)
    return open_rgb(image, max_pixels)


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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_description(info, description: Path, model: str) -> None:
    """Refuse a ``model.json`` whose fields the runtime cannot use (:class:`ModelFileError`)."""
    fix = f"use the model.json written with {model} by mode=export (or export the checkpoint again)"

    def fail(what: str):
        raise ModelFileError(f"{description}: {what}: {fix}")

    if not isinstance(info, dict):
        fail("not a JSON object")
    if info.get("format") != "anomalymoe-onnx":
        fail(f"format {info.get('format')!r} is not 'anomalymoe-onnx' (an exported AnomalyMoE ONNX model)")
    for key, kind in (("class_keys", str), ("experts", str), ("inputs", str), ("outputs", str), ("notes", str)):
        values = info.get(key)
        if not isinstance(values, list) or not values and key != "notes" or not all(isinstance(v, kind) for v in values):
            fail(f"{key} must be a list of strings (found {values!r:.80})")
    pre = info.get("preprocessing")
    if not isinstance(pre, dict) or not isinstance(pre.get("resize"), int) or any(
            not (pre.get(k) is None or isinstance(pre.get(k), int)) for k in ("crop", "segment_size")):
        fail("preprocessing must hold resize (an integer), crop and segment_size (integers or null)")
    if not isinstance(info.get("decision_rule"), str):
        fail("decision_rule must be a string")
    if not isinstance(info.get("scorer"), dict) or not isinstance(info["scorer"].get("eval_size"), int):
        fail("scorer must hold eval_size (an integer)")
    digests = info.get("graph_sha256")
    if not isinstance(digests, dict) or model not in digests or not all(
            isinstance(k, str) and Path(k).name == k and isinstance(v, str) for k, v in digests.items()):
        fail(f"graph_sha256 must give the SHA-256 of {model} and its other files (by file name); a model.json "
             "without it was written before files were sealed")
    statistics, thresholds = info.get("statistics"), info.get("thresholds")
    if not isinstance(statistics, dict) or not isinstance(thresholds, dict):
        fail("statistics and thresholds must be objects with one entry per class")
    for key in [*info["class_keys"], "all"]:
        stats = statistics.get(key)
        if not isinstance(stats, dict):
            fail(f"statistics has no entry for class {key!r}")
        for field in ("low", "high"):
            if not isinstance(stats.get(field), list) or not stats[field] or not all(map(_number, stats[field])):
                fail(f"statistics[{key!r}].{field} must be a list of numbers (found {stats.get(field)!r:.80})")
        for field in ("threshold", "num_images", "score_mean", "score_max"):
            if not _number(stats.get(field)):
                fail(f"statistics[{key!r}].{field} must be a number (found {stats.get(field)!r:.80})")
        if not _number(thresholds.get(key)):
            fail(f"thresholds[{key!r}] must be a number (found {thresholds.get(key)!r:.80})")


def check_graph_files(path: Path, info: dict, description: Path) -> None:
    """Each graph file named in ``graph_sha256`` is beside ``path`` with that digest."""
    together = f"copy {', '.join(info['graph_sha256'])} and {description.name} of one export together"
    for name, digest in info["graph_sha256"].items():
        file = path.parent / name
        if not file.is_file():
            raise ModelFileError(f"{file} not found ({description} lists it: the graph's "
                                 f"{'weights' if name != path.name else 'file'}): {together}")
        if file_digest(file) != digest:
            raise ModelFileError(f"{file} is not the file {description} describes (its SHA-256 differs: damaged, "
                                 f"cut short or from another export): {together}")


def onnx_runner(path: Path, providers: list[str] | None, threads: int | None,
                digest: str | None = None) -> Callable[[dict], dict]:
    """Feed -> outputs by name, with onnxruntime (weights above 1 GiB lie in ``<file>.data`` beside
    it); ``digest``: the :data:`DESCRIPTION_DIGEST` the graph must record."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the graph optimiser warns once per CastLike node it cannot fold
    if threads:
        options.intra_op_num_threads = threads
    requested = providers or ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=requested)
    except Exception as err:  # onnxruntime's own exception types (INVALID_PROTOBUF, NO_SUCHFILE, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"onnxruntime cannot open {path} ({first}): replace it with the model.onnx written by "
                             "mode=export, with its model.onnx.data if it has one") from err
    if digest is not None and session.get_modelmeta().custom_metadata_map.get(DESCRIPTION_DIGEST) != digest:
        raise ModelFileError(f"{path.with_suffix('.json')} is not the description of {path} (the graph records "
                             "another model.json: it was edited, or comes from another export): use the model.json "
                             f"written with {path.name}, or export the checkpoint again")
    dropped = [p for p in (p if isinstance(p, str) else p[0] for p in requested) if p not in session.get_providers()]
    if dropped:  # onnxruntime falls back to the others (its own log of why is at warning level, silenced above)
        warnings.warn(f"{path} runs on {session.get_providers()} without the requested {dropped} (available here: "
                      f"{ort.get_available_providers()})", stacklevel=3)
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


class Detector:
    """An exported model: ``Detector("model.onnx")`` reads ``model.json`` beside it, and refuses
    either file when they do not belong together (module docstring). ``threads``: onnxruntime's
    threads (None: its default); ``providers``: its execution providers (default: the CPU)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 info: dict | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.path = Path(path)
        if self.path.suffix in REFUSED:
            raise ModelFileError(f"{self.path}: {REFUSED[self.path.suffix]}")
        if self.path.suffix not in SUFFIXES:
            raise ModelFileError(f"{self.path}: an exported model is a {' or '.join(SUFFIXES)} file (mode=export)")
        description = self.path.with_suffix(".json")
        if info is None:
            if not description.is_file():
                raise ModelFileError(f"{description} not found: copy the model.json written with {self.path.name}")
            try:
                info = json.loads(description.read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise ModelFileError(f"{description} is not JSON ({err}): use the model.json written with "
                                     f"{self.path.name} by mode=export") from err
        validate_description(info, description, self.path.name)
        check_graph_files(self.path, info, description)
        self.info = info
        self.run = onnx_runner(self.path, providers, threads, description_digest(info))
        pre = info["preprocessing"]
        self.resize, self.crop, self.segment_size = pre["resize"], pre["crop"], pre["segment_size"]
        self.class_keys: list[str] = info["class_keys"]
        self.experts: list[str] = info["experts"]
        self.max_pixels = max_pixels

    def inputs(self, images: list, class_key: str | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for image files, PIL images or arrays (:func:`as_rgb`)."""
        images = [as_rgb(img, i, self.max_pixels) for i, img in enumerate(images)]
        index = -1 if class_key is None else self.class_keys.index(class_key)
        return graph_inputs(images, self.resize, self.crop, self.segment_size, index)

    def predict(self, images: list, class_key: str | None = None) -> Predictions:
        """Score image files, PIL images or numpy arrays (decoded alike, :func:`as_rgb`);
        ``class_key``: the class of all of them (None: each image's class is chosen by the part
        prototypes, or the only class, or all pooled). No images: an empty result."""
        if class_key is not None and class_key not in self.class_keys:
            raise ValueError(f"class_key={class_key!r}: the model holds {self.class_keys}")
        if not len(images):
            size = self.info["scorer"]["eval_size"]
            return Predictions(np.zeros(0, np.float32), np.zeros(0, bool), [], [], np.zeros(0, np.float32),
                               np.zeros((0, size, size), np.float32), np.zeros((0, len(self.experts)), np.float32))
        out = self.run(self.inputs(images, class_key))
        keys = [*self.class_keys, "all"]
        margins = []
        for distances in out["class_distance"]:
            ranked = np.sort(distances)
            chosen = class_key is None and self.segment_size is not None
            margins.append(float(ranked[1] - ranked[0]) if chosen and len(ranked) > 1 else (0.0 if chosen else None))
        return Predictions(out["score"], out["anomalous"], [keys[i] for i in out["class_index"]], margins,
                           out["threshold"], out["anomaly_map"][:, 0], out["routing_weights"])
