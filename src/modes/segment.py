"""mode=segment: compute and cache the component masks of every image of a dataset.

    python run.py mode=segment dataset=mvtec_ad [segment=sam segment.sam_checkpoint=...]

Writes ``<segment.output>/<class>/<split>/<type>/<stem>.npz`` (the format the data modules
read through ``dataset.component_masks``) plus a per-class ``manifest.json``; a re-run only
recomputes what changed (:mod:`src.segment.cache`). When ``segment.truth`` exists (the demo's
true part masks), prints the mean best-match IoU per class.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data_modules.datamodule import AnomalyDataModule
from data_modules.sources import Source
from data_modules.types import DataError
from src.segment.cache import MANIFEST
from src.segment.parts import BackgroundRule
from src.segment.refine import RefineSettings
from src.segment.runner import SegmentReport, part_iou, segment_dataset

log = logging.getLogger(__name__)


def build_features(s: DictConfig, device: str, encoder=None):
    """The dense features of ``segment.features``; ``encoder``: the model's frozen encoder, used
    for backbone features instead of a second instance of ``segment.backbone``."""
    from src.segment.features import BackboneFeatures, ColorFeatures

    if s.features == "color":
        return ColorFeatures(s.color_space, int(s.color_stride))
    if s.features == "backbone":
        return BackboneFeatures(encoder if encoder is not None else hydra.utils.instantiate(s.backbone),
                                list(s.blocks), device)
    raise ValueError(f"segment.features={s.features!r}; choose backbone or color")


def build_segmenter(s: DictConfig, encoder=None):
    """The route's segmenter from the ``segment`` config group (``encoder``: see :func:`build_features`)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else str(s.device)
    if s.route == "cluster":
        from src.segment.cluster import ClusterSegmenter

        refine = RefineSettings(**OmegaConf.to_container(s.refine, resolve=True))
        return ClusterSegmenter(build_features(s, device, encoder), float(s.coreset_ratio), refine, int(s.seed))
    if s.route == "sam":
        from src.segment.sam import SamSegmenter, load_sam

        if s.features != "backbone":
            log.info("route sam: SAM masks are matched across images by segment.features=%s", s.features)
        sam = load_sam(s.sam_checkpoint, s.sam_model_type, OmegaConf.to_container(s.sam_arch, resolve=True) if s.sam_arch else None, device)
        return SamSegmenter(
            sam, build_features(s, device), points_per_side=int(s.points_per_side),
            points_per_batch=int(s.points_per_batch), pred_iou_thresh=float(s.pred_iou_thresh),
            stability_score_thresh=float(s.stability_score_thresh), box_nms_thresh=float(s.box_nms_thresh),
            min_mask_area=float(s.min_mask_area), seed=int(s.seed),
        )
    raise ValueError(f"segment.route={s.route!r}; choose cluster or sam (segment=cluster | segment=sam)")


def format_report(report: SegmentReport, ious: dict | None) -> str:
    lines = [f"Component masks in {report.output}", "",
             "| class | images | computed | from cache | kept slots | dropped | seconds | mean best-match IoU |",
             "|---|---|---|---|---|---|---|---|"]
    for c in report.classes:
        iou = (ious or {}).get(c.class_name, {}).get("iou")
        lines.append(f"| {c.class_name} | {c.images} | {c.computed} | {c.reused} | {len(c.kept)} | {len(c.dropped)} | "
                     f"{c.seconds:.1f} | {'n/a' if iou is None else f'{iou:.3f}'} |")
    return "\n".join(lines)


def output_folders(cfg: DictConfig, datamodule: AnomalyDataModule) -> dict[str, tuple[Source, Path]]:
    """``{dataset: (its source, the folder its masks go to)}``: ``segment.output`` for a
    single dataset, otherwise where each dataset's training reads its masks
    (``component_folder``: its ``component_masks``; the demo's true masks are kept, see
    :class:`data_modules.sources.demo.DemoSource`)."""
    sources = datamodule.sources
    if cfg.segment.get("output"):
        if len(sources) > 1:
            raise DataError(f"segment.output is one folder but there are several datasets ({', '.join(sources)}): leave "
                            "it null to write each to its dataset.sources.<name>.component_masks folder")
        (name, module), = sources.items()
        return {name: (module, Path(cfg.segment.output).expanduser())}
    folders = {}
    for name, module in sources.items():
        if module.component_folder is None:
            raise DataError(f"dataset {name} has no component_masks folder to write to: set segment.output=<folder> "
                            f"or dataset.sources.{name}.component_masks=<folder>")
        folders[name] = (module, module.component_folder)  # where its training reads them
    return folders


def segment_datasets(cfg: DictConfig, datamodule: AnomalyDataModule, encoder=None, first_use: bool = False) -> dict:
    """Segment every image of ``datamodule``'s datasets into their folders (:func:`output_folders`);
    ``first_use`` (``segment.on_first_use``): only the folders that training reads its masks from,
    when they do not exist yet or are a segmentation cache (kept current: only what changed is
    recomputed); never a folder of masks from elsewhere (such as the demo's true masks, where
    mode=segment would write elsewhere), nor a user's own folder of images, which trains without
    parts unless segmented on purpose.
    Returns ``{dataset: summary}`` (output, route, classes, IoU against ``segment.truth``)."""
    s = cfg.segment
    folders = output_folders(cfg, datamodule)
    if first_use:  # only the folders training reads its masks from
        folders = {name: (module, output) for name, (module, output) in folders.items()
                   if module.component_root is not None and output.resolve() == module.component_root.resolve()
                   and (not output.exists() or any(output.glob(f"*/{MANIFEST}")))
                   and not module.components_optional}
    if not folders:
        return {}
    # A relative segment.truth is inside each dataset's root.
    truths = {name: module.root / Path(s.truth).expanduser() if s.get("truth") else None
              for name, (module, _) in folders.items()}
    for name, (_, output) in folders.items():
        truth = truths[name]
        if truth is not None and output.resolve() == truth.resolve():
            raise DataError(f"segment output {output} is the folder of true masks (segment.truth): set segment.output "
                            "to another folder")
    segmenter = build_segmenter(s, encoder)
    k_per_class = OmegaConf.to_container(s.k_per_class, resolve=True) if s.k_per_class else {}
    classes = {}
    for name, (module, _) in folders.items():
        module.prepare_data()
        classes[name] = set(module.class_names())
    unknown = sorted(set(k_per_class) - set().union(*classes.values()))
    if unknown:  # e.g. an experiment's settings for classes of another dataset
        log.warning("segment.k_per_class names class(es) %s that %s does not have (classes: %s): ignored", unknown,
                    datamodule.name, sorted(set().union(*classes.values())))
    summary = {}
    for name, (module, output) in folders.items():
        report = segment_dataset(
            module, segmenter, output, int(s.k), {c: k for c, k in k_per_class.items() if c in classes[name]},
            int(s.image_size), BackgroundRule(**OmegaConf.to_container(s.background, resolve=True)), list(s.splits),
            datamodule.max_pixels,
        )
        truth = truths[name]
        ious = part_iou(output, truth, module, list(s.splits)) if truth is not None and truth.is_dir() else None
        print("\n" + format_report(report, ious) + "\n", flush=True)
        summary[name] = {"output": str(output), "route": s.route,
                         "classes": {c.class_name: {"images": c.images, "computed": c.computed, "reused": c.reused,
                                                    "refit": c.refit, "kept": c.kept, "seconds": c.seconds}
                                     for c in report.classes},
                         "iou": ious}
    return summary


def run(cfg: DictConfig) -> float | None:
    """Segment every image of ``cfg.dataset``; returns the mean IoU against ``segment.truth`` if any."""
    datamodule = hydra.utils.instantiate(cfg.dataset)
    summary = segment_datasets(cfg, datamodule)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "segment.json").write_text(json.dumps(summary if len(summary) > 1 else next(iter(summary.values())), indent=2))
    scored = [v["iou"] for d in summary.values() for v in (d["iou"] or {}).values() if v["iou"] is not None]
    return sum(scored) / len(scored) if scored else None
