"""mode=train: fit (or resume), then test the final weights."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from lightning import Trainer
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from callbacks.resume import find_resume_checkpoint
from src.evaluation.calibration import Calibration, attach_to_checkpoint
from src.tasks import build_components, mean_metric, require_component_masks, run_test

log = logging.getLogger(__name__)


def resolve_resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: a file resumes from it; ``last`` resumes from the newest checkpoint this run's
    folder holds (or starts afresh when there is none, e.g. the first try of a requeued job)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path != "last":
        if ckpt_path and not Path(ckpt_path).expanduser().is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; give a .ckpt file or ckpt_path=last")
        return ckpt_path
    found = find_resume_checkpoint(cfg.paths.output_dir)
    if found is None:
        log.info("ckpt_path=last: no checkpoint under %s yet; training from the start", cfg.paths.output_dir)
    else:
        log.info("ckpt_path=last: resuming from %s", found)
    return str(found) if found else None


def run(cfg: DictConfig) -> float | None:
    """Fit, then test the final weights (the original has no validation split to pick from).

    The test also calibrates on normal training images; the calibration (normalisation
    statistics and decision threshold) is then stored in ``checkpoints/last.ckpt``.
    Returns ``cfg.optimized_metric`` when set (e.g. ``val/image_auroc`` for sweeps), otherwise
    the mean test image AUROC.
    """
    if cfg.model.get("num_component_experts", 0):  # before building the model: fail fast
        data = hydra.utils.instantiate(cfg.dataset)
        if rank_zero_only.rank == 0:
            data.prepare_data()  # the demo generator also writes its true part masks
        data.class_names()  # a missing dataset is reported before its missing masks
        require_component_masks(cfg)
    resume = resolve_resume_path(cfg)
    with open_dict(cfg):
        cfg.ckpt_path = resume  # no file: build the model with its backbone weights as usual
    datamodule, module, trainer = build_components(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    metric = cfg.get("optimized_metric")
    value = float(trainer.callback_metrics[metric]) if metric and metric in trainer.callback_metrics else None
    if metric and value is None:
        raise KeyError(
            f"optimized_metric={metric} was not logged; logged: {sorted(trainer.callback_metrics)}. "
            "Validation metrics need dataset.val_fraction>0 and trainer.limit_val_batches>0."
        )
    if cfg.get("test_after_training", True):
        run_test(trainer, module, datamodule, cfg, calibrate=True)
        _store_calibration(trainer, Path(cfg.paths.output_dir))
    return value if metric else mean_metric(trainer)


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
