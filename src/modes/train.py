"""mode=train: fit, then test the final weights."""

from __future__ import annotations

from omegaconf import DictConfig

from src.tasks import build_components, mean_metric


def run(cfg: DictConfig) -> float | None:
    """Fit, then test the final weights (the original has no validation split to pick from)."""
    datamodule, module, trainer = build_components(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if cfg.get("test_after_training", True):
        trainer.test(module, datamodule=datamodule)
    return mean_metric(trainer)
