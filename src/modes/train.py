"""mode=train: fit, then test the final weights."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning import Trainer
from omegaconf import DictConfig

from src.evaluation.calibration import Calibration, attach_to_checkpoint
from src.tasks import build_components, mean_metric, run_test

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Fit, then test the final weights (the original has no validation split to pick from).

    The test also calibrates on normal training images; the calibration (normalisation
    statistics and decision threshold) is then stored in ``checkpoints/last.ckpt``.
    """
    datamodule, module, trainer = build_components(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if cfg.get("test_after_training", True):
        run_test(trainer, module, datamodule, cfg, calibrate=True)
        _store_calibration(trainer, Path(cfg.paths.output_dir))
    return mean_metric(trainer)


def _store_calibration(trainer: Trainer, output_dir: Path) -> None:
    """Put the run's ``calibration.json`` into the last checkpoint (the file is written by the
    test's rank-zero process and read back here, which also works with spawned processes)."""
    checkpointing = trainer.checkpoint_callback
    if not trainer.is_global_zero or checkpointing is None or not checkpointing.dirpath:
        return
    calibration, last = output_dir / "calibration.json", Path(checkpointing.dirpath) / "last.ckpt"
    if not calibration.is_file() or not last.is_file():
        log.warning("No calibration stored in a checkpoint (%s or %s missing)", calibration, last)
        return
    attach_to_checkpoint(last, Calibration.load(calibration))
    log.info("Stored the normal-image calibration in %s", last)
