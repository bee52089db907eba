"""mode=test: evaluate a checkpoint of this project or an original-format state dict."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from src.build import build_components
from src.checkpoints import load_weights, read_checkpoint
from src.modes.train import logged_metric
from src.segment.online import OnlineSegmenter

log = logging.getLogger(__name__)


def segment_missing_test_masks(module, datamodule) -> None:
    """Test images without cached component masks (added after training) are segmented with the
    checkpoint's part prototypes, like a new image in mode=predict, before the test reads them."""
    folders = datamodule.component_class_folders() if hasattr(datamodule, "component_class_folders") else None
    if module.segmentation is None or not folders or module.net.num_experts[2] == 0:
        return
    segmenter = OnlineSegmenter(module.segmentation, module.net.encoder, max_pixels=datamodule.max_pixels)
    if not segmenter.available:
        log.info("Test images without cached component masks cannot be segmented: %s", segmenter.reason)
        return
    datamodule.prepare_data()
    count = segmenter.segment_missing(datamodule, folders)
    if count:
        log.info("Segmented %d test images without cached component masks with the checkpoint's prototypes", count)


def run(cfg: DictConfig) -> float | None:
    """Evaluate ``ckpt_path``: a checkpoint of this project (its model rebuilt from the checkpoint,
    :func:`src.entry.use_checkpoint`) or the original ``model_final.pth``. The test uses the
    checkpoint's calibration, or computes one first when it has none (or with
    ``evaluation.recalibrate=true``). Returns the mean test image AUROC."""
    checkpoint = read_checkpoint(cfg.ckpt_path)
    datamodule, module, trainer = build_components(cfg)
    load_weights(module, checkpoint, calibration=not cfg.evaluation.recalibrate)
    segment_missing_test_masks(module, datamodule)
    log.info("Testing %s (%s format, step %s) with the %s protocol", checkpoint.path, checkpoint.kind,
             checkpoint.global_step, module.evaluator.protocol)
    trainer.test(module, datamodule=datamodule, verbose=False)  # the ResultsWriter prints the tables
    return logged_metric(trainer, "test/image_auroc")
