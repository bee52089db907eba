"""mode=predict: score new images, each on its own, with a threshold chosen on normal data.

    python run.py mode=predict ckpt_path=<.ckpt or model_final.pth> predict.input=<image or folder>

A new image takes the path a test image takes (``mode=test evaluation.protocol=inductive``):

* its class: ``predict.class_key``, or, when the checkpoint holds several classes and their part
  prototypes, the class whose prototypes fit its features best (reported with the margin of the
  choice, :mod:`src.segment.online`);
* its component masks: computed on the fly with that class's prototypes, exactly as
  ``mode=segment`` computed the training and test images' masks (or read from
  ``predict.component_masks``);
* its score: the model's maps scored by :class:`src.evaluation.scorer.Scorer` with the class's
  normal-image statistics (:mod:`src.evaluation.calibration`), and anomalous when the score
  reaches the class's threshold.

An image that cannot be segmented (a checkpoint without prototypes, such as an original-format
file or a model trained on masks that ``mode=segment`` did not compute) is scored without masks,
against statistics computed without masks (``Calibration.unmasked``); the summary says so. It is
never scored against statistics of images that had masks. The statistics come from the checkpoint (``mode=train`` stores them
in ``last.ckpt``); when it has none, or with ``evaluation.recalibrate=true``, they are computed
(:meth:`src.module.AnomalyMoEModule.calibrate`) from the configured dataset's normal training
images and saved as ``calibration.json``. A checkpoint of this project also gives the model and
the preprocessing (:mod:`src.checkpoints`), so ``ckpt_path`` and ``predict.input`` are all it needs.

Writes to ``predict.output_dir``: ``predictions.json`` (every image's score, decision, class and
how it was chosen, the images that could not be read and why, the files that are not images),
``predictions.csv`` (the columns of a test run's ``scores.csv``) and one heat-map PNG per image in
``heatmaps/`` (image | heat map | predicted mask), through
:class:`src.prediction_writer.PredictionWriter`: results are recorded as each image is scored,
and a stopped prediction continues when run again. Component masks of the inputs, if any, are
read from ``predict.component_masks`` (same relative layout as the input, ``.npz``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from data_modules.components import read_component_masks
from data_modules.dataset import AnomalyTransforms, collate_samples
from data_modules.io import DEFAULT_MAX_PIXELS, open_image, pixel_limit
from data_modules.types import IMAGE_EXTENSIONS, DataError
from src.build import build_module
from src.checkpoints import load_weights, read_checkpoint
from src.errors import ConfigError
from src.evaluation.calibration import GROUPS, POOLED, NormalStatistics
from src.evaluation.report import expert_names, score_row, write_score_rows
from src.evaluation.visualize import fit_image, render_panels
from src.inference import is_exported
from src.prediction_writer import PredictionWriter, refuse_finished, relative_path
from src.run_folder import acquire_lock
from src.segment.online import OnlineSegmenter

log = logging.getLogger(__name__)


def list_inputs(path: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """Images to score and the other files found (reported, not scored)."""
    if not path.exists():
        raise FileNotFoundError(f"predict.input={path} does not exist")
    if path.is_file():
        return [path], []
    files = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DataError(f"predict.input={path} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                        + ("" if recursive else "; predict.recursive=true also searches sub-folders"))
    return images, [p for p in files if p not in images]


class ImageFiles(Dataset):
    """Images with the test-time pipeline; an unreadable file yields its error instead.

    Component masks come from ``segmenter`` (an :class:`~src.segment.online.OnlineSegmenter`,
    which also chooses the class unless ``class_key`` is given), or from ``mask_root``:
    ``<mask_root>/<path relative to root, suffix .npz>`` (the format of :mod:`data_modules.components`).
    Each item says which: ``masks_from`` is ``computed``, ``files`` or ``none``.
    """

    def __init__(self, paths: list[Path], transforms: AnomalyTransforms, root: Path, mask_root: Path | None = None,
                 segmenter: OnlineSegmenter | None = None, class_key: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.paths, self.transforms, self.root, self.mask_root = paths, transforms, root, mask_root
        self.segmenter, self.class_key, self.max_pixels = segmenter, class_key, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            img = open_image(path, max_pixels=self.max_pixels)
            item = {"path": str(path), "image": self.transforms.image(img), "display": self.transforms.display(img),
                    "class_key": self.class_key, "class_margin": None, "masks_from": "none"}
            masks = None
            if self.segmenter is not None:
                masks, choice = self.segmenter.segment(path, self.class_key)
                item.update(class_key=choice.key, class_margin=choice.margin if self.class_key is None else None,
                            masks_from="computed")
            elif self.mask_root is not None:
                mask_file = self.mask_root / relative_path(path, self.root).with_suffix(".npz")
                if not mask_file.is_file():
                    raise DataError(f"component masks for {path} not found: expected {mask_file}")
                masks = read_component_masks(mask_file)
                item["masks_from"] = "files"
            if masks is not None:
                if masks.shape[1:] != (img.height, img.width):
                    raise DataError(f"component masks of {path} are {masks.shape[1:]} but the image is "
                                    f"{(img.height, img.width)}")
                item["masks"] = self.transforms.masks(masks)
            return item
        except (DataError, OSError, ValueError) as err:
            return {"path": str(path), "error": str(err)}


INFO = ("display", "class_key", "class_margin", "masks_from")  # per image, kept as lists


def collate(items: list[dict]) -> dict:
    """The readable images as a batch (``image``, ``masks``, ``num_masks``), the lists of
    :data:`INFO` and ``errors`` of the others."""
    readable = [i for i in items if "error" not in i]
    errors = [{"path": i["path"], "error": i["error"]} for i in items if "error" in i]
    if not readable:
        return {"errors": errors}
    info = {k: [i.pop(k) for i in readable] for k in INFO}
    return {**collate_samples(readable), **info, "errors": errors}


def choose_segmenter(module, settings, device, max_pixels: int = DEFAULT_MAX_PIXELS
                     ) -> tuple[OnlineSegmenter | None, str | None]:
    """The on-the-fly segmenter of a model with component experts, or None and the note saying
    how its images are scored instead."""
    if module.net.num_experts[2] == 0 or settings.get("component_masks"):
        return None, None
    if module.segmentation is None:
        return None, ("the checkpoint holds no part prototypes (an original-format checkpoint, or a model trained on "
                      "masks that mode=segment did not compute): images are scored without component masks, against "
                      "statistics of normal images scored without masks")
    segmenter = OnlineSegmenter(module.segmentation, module.net.encoder, str(device), max_pixels)
    if not segmenter.available:
        return None, (f"images cannot be segmented ({segmenter.reason}): they are scored without component masks, "
                      "against statistics of normal images scored without masks")
    return segmenter, None


def calibrate_if_missing(module, datamodule, unmasked: bool) -> str:
    """Give ``module`` the calibration its images are scored with: the checkpoint's, or, when it
    has none (or none of images without masks, which ``unmasked`` images need), one computed from
    the dataset's normal training images. Returns where the statistics come from."""
    if module.calibration is not None and not (unmasked and module.calibration.unmasked is None):
        return "checkpoint"
    name = getattr(datamodule, "name", "?")
    log.info("Computing the normal-image calibration from dataset '%s' (the checkpoint holds none%s)", name,
             " for images without component masks" if module.calibration is not None else "")
    module.calibrate(datamodule)
    return f"computed from the normal training images of dataset '{name}'"


def statistics_for(module, calibration, key: str, masked: bool) -> NormalStatistics:
    """The statistics of the pipeline an image took: with or without component masks (the same
    for a model without component experts)."""
    return calibration.get(key, masks=masked or module.net.num_experts[2] == 0)


def score_with_checkpoint(module, calibration, loader: DataLoader, group_maps: bool = False) -> Iterator[dict]:
    """Each image of ``loader`` (:class:`ImageFiles`) scored by the model with its class's statistics:
    one record per image (see :func:`write_predictions`), ``{"path", "error"}`` for an unreadable one."""
    scorer = module.evaluator.scorer
    for batch, prediction in module.infer(loader):
        yield from batch.pop("errors")
        if prediction is None:
            continue
        for i, path in enumerate(batch["path"]):
            key, masked = batch["class_key"][i], batch["masks_from"][i] != "none"
            stats = statistics_for(module, calibration, key, masked)
            scored = scorer.score(prediction.select([i]), stats)
            record = {"path": path, "class": key or POOLED, "class_margin": batch["class_margin"][i],
                      "masks_from": batch["masks_from"][i], "score": float(scored.scores[0]),
                      "anomalous": bool(scored.anomalous[0]), "routing": prediction.routing_weights[i].tolist(),
                      "map": scored.final[0, 0].cpu().numpy(), "display": batch["display"][i], "statistics": stats}
            if group_maps:  # the raw maps of the three expert groups, model resolution
                record["group_maps"] = {g: getattr(prediction, f"map_{g}")[i, 0].cpu().numpy() for g in GROUPS}
            yield record


def score_with_export(detector, paths: list[Path], transforms: AnomalyTransforms, class_key: str | None,
                      batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict]:
    """The same records from an exported model (:class:`src.inference.Detector`)."""
    stats = {k: NormalStatistics(**v) for k, v in detector.info["statistics"].items()}
    masks_from = "computed" if detector.segment_size else "none"
    for start in range(0, len(paths), batch_size):
        images, readable = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(open_image(path, max_pixels=max_pixels))
                readable.append(path)
            except (DataError, OSError, ValueError) as err:
                yield {"path": str(path), "error": str(err)}
        if not images:
            continue
        out = detector.predict(images, class_key)
        for i, path in enumerate(readable):
            yield {"path": str(path), "class": out.classes[i], "class_margin": out.class_margins[i],
                   "masks_from": masks_from, "score": float(out.scores[i]), "anomalous": bool(out.anomalous[i]),
                   "routing": out.routing_weights[i].tolist(), "map": out.maps[i], "display": transforms.display(images[i]),
                   "statistics": stats[out.classes[i]]}


def run(cfg: DictConfig) -> float | None:
    """Score ``predict.input``; returns the fraction of readable images called anomalous."""
    settings = cfg.predict
    if not settings.get("input"):
        raise ConfigError("mode=predict needs predict.input=<an image file or a folder of images>")
    root = Path(settings.input).expanduser()
    images, others = list_inputs(root, settings.recursive)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    own = out.resolve() != Path(cfg.paths.output_dir).resolve()  # else the run's own lock holds it
    lock = acquire_lock(out, "predict.output_dir") if own else None  # the prediction folder is held like a run folder, wherever it lies
    try:
        refuse_finished(out)
        if is_exported(cfg.ckpt_path):
            return run_exported(cfg, images, others, root, out)
        return run_checkpoint(cfg, images, others, root, out)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def run_checkpoint(cfg: DictConfig, images: list[Path], others: list[Path], root: Path, out: Path) -> float | None:
    """``mode=predict`` with a checkpoint of this project or an original-format file."""
    settings = cfg.predict
    checkpoint = read_checkpoint(cfg.ckpt_path)
    datamodule, module = build_module(cfg)
    load_weights(module, checkpoint, calibration=not cfg.evaluation.recalibrate)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")
    module.configure_model()  # the speed options (module.compile_experts, module.channels_last)
    module.to(device).eval()

    mask_root = Path(settings.component_masks).expanduser() if settings.get("component_masks") else None
    segmenter, segment_note = choose_segmenter(module, settings, device, datamodule.max_pixels)
    unmasked = module.net.num_experts[2] > 0 and segmenter is None and mask_root is None
    source = calibrate_if_missing(module, datamodule, unmasked)
    if source != "checkpoint":
        module.calibration.save(out / "calibration.json")
    calibration = module.calibration
    class_key = settings.class_key
    keys = [k for k in calibration.stats if k != POOLED]
    if class_key is not None and class_key not in calibration.stats:
        raise ConfigError(f"predict.class_key={class_key!r}: no calibration for it; calibrated: {sorted(calibration.stats)}")
    if class_key is not None and segmenter is not None and class_key not in segmenter.parts.classes:
        raise ConfigError(f"predict.class_key={class_key!r}: images are segmented with their class's part prototypes, "
                          f"and this checkpoint has them for {sorted(segmenter.parts.classes)}; set one of those, or "
                          "leave predict.class_key unset to choose each image's class")
    notes = list(calibration.notes) + ([segment_note] if segment_note else [])
    if class_key is None and segmenter is None and len(keys) == 1:
        class_key = keys[0]
    elif class_key is None and segmenter is None:
        notes.append(f"the class of an image can only be chosen with part prototypes: every image is scored with "
                     f"the statistics of all {len(keys)} classes pooled (set predict.class_key for one class)")
    if segmenter is not None:
        log.info("Component masks of every image computed on the fly (route %s, %d classes' prototypes)%s",
                 module.segmentation.route, len(module.segmentation.classes),
                 "" if class_key else "; each image's class chosen by its nearest part prototypes")

    writer = open_writer(out, root, checkpoint.path, settings)  # after every check: an unfinished folder could run
    transforms = getattr(datamodule, "transforms", None) or AnomalyTransforms()
    dataset = ImageFiles(writer.todo(images), transforms, root, mask_root, segmenter, class_key, datamodule.max_pixels)
    loader = DataLoader(dataset, batch_size=settings.batch_size, collate_fn=collate)
    records = score_with_checkpoint(module, calibration, loader, bool(settings.get("save_group_maps")))
    header = {"checkpoint": str(checkpoint.path), "checkpoint_format": checkpoint.kind,
              "checkpoint_step": checkpoint.global_step, "input": str(root), "protocol": "inductive",
              "class_key": settings.class_key or ("chosen per image" if segmenter is not None else class_key or POOLED),
              "statistics_source": source, "decision_rule": calibration.rule, "notes": notes}
    return write_predictions(records, header, expert_names(module.net.num_experts), images, others, out, settings,
                             writer, lambda key, masked: statistics_for(module, calibration, key, masked))


def run_exported(cfg: DictConfig, images: list[Path], others: list[Path], root: Path, out: Path) -> float | None:
    """``mode=predict`` with an exported ``model.onnx``: the same files, scored by onnxruntime (a
    ``model.pt2`` is refused by :class:`src.inference.Detector`)."""
    from src.inference import Detector

    settings = cfg.predict
    if settings.get("component_masks") or settings.get("save_group_maps") or cfg.evaluation.recalibrate:
        raise ConfigError("an exported model computes its masks and holds its calibration: predict.component_masks, "
                          "predict.save_group_maps and evaluation.recalibrate need the checkpoint (.ckpt)")
    detector = Detector(cfg.ckpt_path)
    info = detector.info
    if settings.class_key is not None and settings.class_key not in info["class_keys"]:
        raise ConfigError(f"predict.class_key={settings.class_key!r}: the exported model holds {info['class_keys']}")
    pre = info["preprocessing"]
    transforms = AnomalyTransforms(pre["resize"], pre["crop"])
    writer = open_writer(out, root, Path(cfg.ckpt_path), settings)
    records = score_with_export(detector, writer.todo(images), transforms, settings.class_key, settings.batch_size,
                                pixel_limit(cfg.dataset.get("max_image_pixels")))
    stats = {k: NormalStatistics(**v) for k, v in info["statistics"].items()}
    chosen = "chosen per image" if detector.segment_size else (info["class_keys"][0] if len(info["class_keys"]) == 1
                                                                else POOLED)
    header = {"checkpoint": str(cfg.ckpt_path), "checkpoint_format": info["format"].removeprefix("anomalymoe-"),
              "checkpoint_step": info.get("global_step"),
              "input": str(root), "protocol": "inductive", "class_key": settings.class_key or chosen,
              "statistics_source": "exported model", "decision_rule": info["decision_rule"], "notes": info["notes"]}
    return write_predictions(records, header, info["experts"], images, others, out, settings, writer,
                             lambda key, masked: stats[key])


def open_writer(out: Path, root: Path, checkpoint: Path, settings) -> PredictionWriter:
    """The prediction folder's writer (a stopped prediction of the same settings and the same
    checkpoint content continues)."""
    from src.inference import file_digest

    return PredictionWriter(out, root, {"checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint),
                                        "input": str(root), "class_key": settings.class_key})


def write_predictions(records: Iterable[dict], header: dict, names: list[str], images: list[Path], others: list[Path],
                      out: Path, settings, writer: PredictionWriter,
                      statistics_of: Callable[[str, bool], NormalStatistics]) -> float | None:
    """``predictions.json``, ``predictions.csv``, heat maps (and group maps) from the scored records,
    each recorded by ``writer`` as it comes; ``statistics_of(class, with masks)`` gives the
    statistics an image was scored with. Returns the fraction of readable images called anomalous."""
    maps_dir = out / "group_maps"
    if settings.get("save_group_maps"):
        maps_dir.mkdir(exist_ok=True)
    start, scored = time.perf_counter(), 0  # images per second: reading, scoring and writing, this run's images
    for record in records:
        if "error" in record:
            writer.add([record])
            continue
        scored += 1
        path, key, stats = record["path"], record["class"], record["statistics"]
        entry = {"path": path, "class": key, "score": record["score"], "anomalous": record["anomalous"],
                 "component_masks": record["masks_from"],
                 "experts": {n: round(w, 6) for n, w in zip(names, record["routing"]) if w > 0}}
        if record["class_margin"] is not None:
            entry["class_margin"] = record["class_margin"]
        if settings.heatmaps:
            heat = record["map"]
            image = fit_image(record["display"], heat.shape[-1])
            entry["heatmap"] = writer.heatmap(render_panels(image, heat, 2 * stats.threshold, stats.threshold), path)
        if "group_maps" in record:
            name = "__".join(relative_path(Path(path), writer.root).with_suffix("").parts) + ".npz"
            np.savez_compressed(maps_dir / name, **record["group_maps"])
            entry["group_maps"] = f"group_maps/{name}"
        writer.add([entry])
    seconds = time.perf_counter() - start
    rate = scored / seconds if scored and seconds > 0 else None
    results, errors = writer.results(images)  # with those of an earlier, stopped run
    for error in errors:
        log.warning("not scored: %s", error["error"])
    rows = [score_row(r["path"], r["class"], r["score"], r["anomalous"], [r["experts"].get(n, 0.0) for n in names],
                      names) for r in results]
    statistics = {f"{r['class']}{'' if r['component_masks'] != 'none' else ' (without masks)'}":
                  asdict(statistics_of(r["class"], r["component_masks"] != "none")) for r in results}

    flagged = sum(r["anomalous"] for r in results)
    chosen = [r for r in results if "class_margin" in r]
    if chosen:
        uncertain = sorted(chosen, key=lambda r: r["class_margin"])[:3]
        log.info("Class chosen for %d images: %s; smallest margins: %s", len(chosen),
                 dict(Counter(r["class"] for r in chosen)),
                 ", ".join(f"{Path(r['path']).name} -> {r['class']} ({r['class_margin']:.3g})" for r in uncertain))
    source = header.pop("statistics_source")
    summary = {
        **{k: v for k, v in header.items() if k not in ("decision_rule", "notes")},
        "statistics": {"source": source, "classes": dict(sorted(statistics.items()))},
        "decision_rule": header["decision_rule"],
        "heatmap": "image | heat map, blue 0 to red at twice the class's threshold | predicted mask: map >= threshold",
        "notes": header["notes"],
        "num_images": len(images),
        "num_scored": len(results),
        "num_anomalous": flagged,
        "num_errors": len(errors),
        "images_per_s": rate,
        "images": results,
        "errors": errors,
        "skipped": [{"path": str(p), "reason": "not an image file extension"} for p in others],
    }
    write_score_rows(rows, out / "predictions.csv", names)
    writer.finish(summary)
    log.info("Scored %d of %d images (%d anomalous, %d unreadable, %d other files skipped%s); wrote %s and %s",
             len(results), len(images), flagged, len(errors), len(others),
             f", {rate:.1f} images/s" if rate else "", out / "predictions.json", out / "predictions.csv")
    return flagged / len(results) if results else None
