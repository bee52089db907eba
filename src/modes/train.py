"""mode=train: fit (or resume), then test the final weights."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from callbacks.resume import find_resume_checkpoint
from src.tasks import build_components, mean_metric

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

    Returns ``cfg.optimized_metric`` when set (e.g. ``val/image_auroc`` for sweeps), otherwise
    the mean test image AUROC.
    """
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
        trainer.test(module, datamodule=datamodule)
    return value if metric else mean_metric(trainer)
