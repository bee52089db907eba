"""mode=test: evaluate a checkpoint of this project or an original-format state dict."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from src.tasks import build_components, load_weights, mean_metric, run_test

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Evaluate ``ckpt_path``: a checkpoint of this project or the original ``model_final.pth``."""
    if not cfg.get("ckpt_path"):
        raise ValueError("mode=test needs ckpt_path=<Lightning .ckpt or original model_final.pth>")
    datamodule, module, trainer = build_components(cfg)
    kind = load_weights(module, cfg.ckpt_path)
    log.info("Loaded %s checkpoint %s", kind, cfg.ckpt_path)
    run_test(trainer, module, datamodule, cfg)
    return mean_metric(trainer)
