"""mode=predict: score new images, each on its own, with a threshold chosen on normal data.

    python run.py mode=predict ckpt_path=<.ckpt or model_final.pth> predict.input=<image or folder>

Every image is scored with the inductive protocol (maps normalised by the statistics of normal
training images, :mod:`src.evaluation.calibration`) and called anomalous when its score reaches
the calibration's threshold. The statistics come from the checkpoint (``mode=train`` stores them
in ``last.ckpt``); when it has none, or with ``evaluation.recalibrate=true``, they are computed
(:meth:`src.module.AnomalyMoEModule.calibrate`) from the configured dataset's normal training
images and saved as ``calibration.json``. A checkpoint of this project also gives the model and
the preprocessing (:mod:`src.checkpoints`), so ``ckpt_path`` and ``predict.input`` are all it needs.

Writes to ``predict.output_dir``: ``predictions.json`` (every image's score and decision, the
images that could not be read and why, the files that are not images) and one heat-map PNG per
image in ``heatmaps/`` (image | heat map | predicted mask), through
:class:`src.prediction_writer.PredictionWriter`: results are recorded as each batch is scored,
and a stopped prediction continues when run again. Component masks of the inputs, if any, are
read from ``predict.component_masks`` (same relative layout as the input, ``.npz``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from data_modules.base import IMAGE_EXTENSIONS, AnomalyTransforms, DataError, collate_samples, open_image
from data_modules.components import read_component_masks
from src.build import build_module
from src.checkpoints import load_weights, read_checkpoint
from src.errors import ConfigError
from src.evaluation.report import expert_names
from src.evaluation.visualize import fit_image, render_panels
from src.prediction_writer import PredictionWriter, relative_path

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

    With ``mask_root``, each image's component masks are read from
    ``<mask_root>/<path relative to root, suffix .npz>`` (the format of
    :mod:`data_modules.components`).
    """

    def __init__(self, paths: list[Path], transforms: AnomalyTransforms, root: Path, mask_root: Path | None = None) -> None:
        self.paths, self.transforms, self.root, self.mask_root = paths, transforms, root, mask_root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            img = open_image(path)
            item = {"path": str(path), "image": self.transforms.image(img), "display": self.transforms.display(img)}
            if self.mask_root is not None:
                mask_file = self.mask_root / relative_path(path, self.root).with_suffix(".npz")
                if not mask_file.is_file():
                    raise DataError(f"component masks for {path} not found: expected {mask_file}")
                masks = read_component_masks(mask_file)
                if masks.shape[1:] != (img.height, img.width):
                    raise DataError(f"component masks {mask_file} are {masks.shape[1:]} but {path} is "
                                    f"{(img.height, img.width)}")
                item["masks"] = self.transforms.masks(masks)
            return item
        except (DataError, OSError, ValueError) as err:
            return {"path": str(path), "error": str(err)}


def collate(items: list[dict]) -> dict:
    """The readable images as a batch (``image``, ``masks``, ``num_masks``), ``display`` images
    and ``errors`` of the others."""
    readable = [i for i in items if "error" not in i]
    errors = [{"path": i["path"], "error": i["error"]} for i in items if "error" in i]
    if not readable:
        return {"errors": errors}
    display = [i.pop("display") for i in readable]
    return {**collate_samples(readable), "display": display, "errors": errors}


def run(cfg: DictConfig) -> float | None:
    """Score ``predict.input``; returns the fraction of readable images called anomalous."""
    settings = cfg.predict
    if not settings.get("input"):
        raise ConfigError("mode=predict needs predict.input=<an image file or a folder of images>")
    root = Path(settings.input).expanduser()
    images, others = list_inputs(root, settings.recursive)
    checkpoint = read_checkpoint(cfg.ckpt_path)
    datamodule, module = build_module(cfg)
    load_weights(module, checkpoint, calibration=not cfg.evaluation.recalibrate)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")
    module.configure_model()  # the speed options (module.compile_experts, module.channels_last)
    module.to(device).eval()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = PredictionWriter(out, root, {"checkpoint": str(checkpoint.path), "input": str(root),
                                          "class_key": settings.class_key})

    source = "checkpoint"
    if module.calibration is None:
        name = getattr(datamodule, "name", "?")
        log.info("Computing the normal-image calibration from dataset '%s'", name)
        module.calibrate(datamodule)
        source = f"computed from the normal training images of dataset '{name}'"
        module.calibration.save(out / "calibration.json")
    calibration = module.calibration
    try:
        stats = calibration.get(settings.class_key)
    except KeyError as err:
        raise ConfigError(f"predict.class_key={settings.class_key!r}: {err.args[0]}") from err
    notes = list(calibration.notes)
    mask_root = Path(settings.component_masks).expanduser() if settings.get("component_masks") else None
    if mask_root is None and module.net.num_experts[2] > 0:
        notes.append("the model has component experts and these inputs have no component masks "
                     "(predict.component_masks): their component map is 0, so their scores can be lower than "
                     "those of the calibration images")

    transforms = getattr(datamodule, "transforms", None) or AnomalyTransforms()
    dataset = ImageFiles(writer.todo(images), transforms, root, mask_root)
    loader = DataLoader(dataset, batch_size=settings.batch_size, collate_fn=collate)
    names = expert_names(module.net.num_experts)
    for batch in loader:
        writer.add(batch.pop("errors"))
        if "image" not in batch:
            continue
        with torch.no_grad():
            prediction = module.anomaly_maps({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
            final, scores = module.calibrator.score(prediction, stats)
        rows = []
        for i, path in enumerate(batch["path"]):
            score = float(scores[i])
            entry = {"path": path, "score": score, "anomalous": score >= stats.threshold,
                     "experts": {n: round(float(w), 6) for n, w in zip(names, prediction.routing_weights[i]) if w > 0}}
            if settings.heatmaps:
                heat = final[i, 0].cpu().numpy()
                image = fit_image(batch["display"][i], heat.shape[-1])
                entry["heatmap"] = writer.heatmap(render_panels(image, heat, 2 * stats.threshold, stats.threshold), path)
            rows.append(entry)
        writer.add(rows)
    results, errors = writer.results(images)
    for error in errors:
        log.warning("not scored: %s", error["error"])

    flagged = sum(r["anomalous"] for r in results)
    summary = {
        "checkpoint": str(checkpoint.path),
        "checkpoint_format": checkpoint.kind,
        "checkpoint_step": checkpoint.global_step,
        "input": str(root),
        "protocol": "inductive",
        "statistics": {"class_key": settings.class_key or "all", "source": source, "threshold": stats.threshold,
                       "low": stats.low, "high": stats.high, "num_images": stats.num_images},
        "decision_rule": calibration.rule,
        "heatmap": "image | heat map, blue 0 to red at twice the threshold | predicted mask: map >= threshold",
        "notes": notes,
        "num_images": len(images),
        "num_scored": len(results),
        "num_anomalous": flagged,
        "num_errors": len(errors),
        "images": results,
        "errors": errors,
        "skipped": [{"path": str(p), "reason": "not an image file extension"} for p in others],
    }
    writer.finish(summary)
    log.info("Scored %d of %d images (%d anomalous at threshold %.4g, %d unreadable, %d other files skipped); "
             "wrote %s", len(results), len(images), flagged, stats.threshold, len(errors), len(others),
             out / "predictions.json")
    return flagged / len(results) if results else None
