"""mode=train: fit (or resume), then test the final weights."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from lightning import Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from src.build import build_components, require_component_masks
from src.checkpoints import load_weights, read_checkpoint
from src.errors import ConfigError
from src.models.weight_formats import CheckpointError

log = logging.getLogger(__name__)


def logged_metric(trainer: Trainer, name: str) -> float | None:
    """A metric the module logged (``trainer.callback_metrics``), or None."""
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None


def check_slurm_restore(trainer: Trainer, ckpt_path: str | None) -> None:
    """Without ``ckpt_path``, Lightning on SLURM restores the newest ``hpc_ckpt_<n>.ckpt`` of the
    run folder by itself: read it first the project's way, so that a file it refuses (one holding
    Python objects, a damaged one) is the project's one-line error, not torch's traceback."""
    if ckpt_path is None and SLURMEnvironment.detect():
        path = trainer._checkpoint_connector._hpc_resume_path
        if path is None:
            return
        try:
            read_checkpoint(path, what="SLURM requeue checkpoint")
        except CheckpointError as err:
            raise CheckpointError(f"{err}. Lightning restores {Path(path).name} by itself on SLURM: move it out of "
                                  f"{Path(path).parent} to train without it") from None


def take_final_checkpoint(trainer: Trainer, module) -> None:
    """After a fit in spawned processes (``trainer=ddp_sim``) this process's module has the final
    weights but not what the fit knew about them: load ``last.ckpt`` (weights, calibration, file
    and step), so that the test names the checkpoint it evaluates."""
    callback = trainer.checkpoint_callback
    spawned = isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)
    if not spawned or module.checkpoint_info is not None or not getattr(callback, "dirpath", None):
        return
    last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    if last.is_file():
        load_weights(module, read_checkpoint(last))


def run(cfg: DictConfig) -> float | None:
    """Fit, then test the final weights (the original has no validation split to pick from).

    ``ckpt_path`` (resolved by :func:`src.entry.use_checkpoint`; ``last`` = the newest checkpoint
    of the run folder that loads) resumes training. When the fit ends the module calibrates on
    normal training images and ``checkpoints/last.ckpt`` is written with that calibration; the
    test then evaluates exactly those weights. Returns ``cfg.optimized_metric`` when set (e.g.
    ``val/image_auroc`` for sweeps), otherwise the mean test image AUROC.
    """
    first_use = bool(cfg.get("segment", {}).get("on_first_use"))
    if cfg.model.get("num_component_experts", 0):  # before building the model: fail fast
        data = hydra.utils.instantiate(cfg.dataset)
        if rank_zero_only.rank == 0:
            data.prepare_data()  # the demo generator also writes its true part masks
        data.class_names()  # a missing dataset is reported before its missing masks
        if not first_use:
            require_component_masks(cfg, data)
    datamodule, module, trainer = build_components(cfg)
    if first_use and cfg.model.get("num_component_experts", 0):
        # Masks of the datasets whose folder does not exist yet, or is a segmentation cache that may
        # be stale (only what changed is recomputed), with the model's own encoder (so a checkpoint
        # can segment new images the same way); then the usual check.
        from src.modes.segment import segment_datasets

        if rank_zero_only.rank == 0:
            summary = segment_datasets(cfg, datamodule, module.net.encoder, first_use=True)
            computed = sum(c["computed"] for d in summary.values() for c in d["classes"].values())
            if computed:
                log.info("Component masks of %d images computed (segment.on_first_use=true)", computed)
        require_component_masks(cfg, datamodule)
    check_slurm_restore(trainer, cfg.get("ckpt_path"))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    take_final_checkpoint(trainer, module)
    metric = cfg.get("optimized_metric")
    value = logged_metric(trainer, metric) if metric else None
    if metric and value is None:
        raise ConfigError(
            f"optimized_metric={metric} was not logged; logged: {sorted(trainer.callback_metrics)}. "
            "Validation metrics need dataset.val_fraction>0 and trainer.limit_val_batches>0."
        )
    if cfg.get("test_after_training", True):
        trainer.test(module, datamodule=datamodule, verbose=False)  # the ResultsWriter prints the tables
    return value if metric else logged_metric(trainer, "test/image_auroc")
