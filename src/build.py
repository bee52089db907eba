"""Objects from the composed config: datamodule, Lightning module, trainer, callbacks, loggers,
and the run description every checkpoint carries."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.resume import RunDescription
from data_modules.types import IMAGENET_MEAN, IMAGENET_STD
from src.checkpoints import AtomicCheckpointIO
from src.loggers import git_commit
from src.models.anomalymoe import AnomalyMoE
from src.models.backbone import WEIGHTS_DEFERRED
from src.module import AnomalyMoEModule

log = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[1]


def _instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_module(cfg: DictConfig) -> tuple[LightningDataModule, AnomalyMoEModule]:
    """Datamodule and Lightning module from the composed config."""
    if cfg.get("ckpt_path"):
        # The checkpoint holds the encoder: do not download or load backbone weights first.
        with open_dict(cfg):
            cfg.model.backbone.weights = WEIGHTS_DEFERRED
    if not cfg.model.get("num_component_experts", 0) and "sources" in cfg.dataset:
        datamodule = hydra.utils.instantiate(cfg.dataset, component_masks=None)  # no experts read them
    else:
        datamodule = hydra.utils.instantiate(cfg.dataset)
    net: AnomalyMoE = hydra.utils.instantiate(cfg.model)
    module: AnomalyMoEModule = hydra.utils.instantiate(cfg.module, net=net)
    return datamodule, module


def describe_run(cfg: DictConfig) -> dict:
    """What a checkpoint needs to be used on its own (:mod:`src.checkpoints`); the class keys
    are added by the module when it is saved."""
    return {
        "format": 1,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "preprocessing": {"image_size": cfg.dataset.get("image_size"), "resize": cfg.dataset.get("resize"),
                          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "dataset": cfg.dataset.get("name"),
        "git": git_commit(REPOSITORY),
    }


def build_components(cfg: DictConfig) -> tuple[LightningDataModule, AnomalyMoEModule, Trainer]:
    """Datamodule, Lightning module and trainer from the composed config.

    The trainer writes checkpoints atomically (:class:`src.checkpoints.AtomicCheckpointIO`) and
    each one carries the run description (:func:`describe_run`).
    """
    description = describe_run(cfg)  # before build_module defers the backbone weights
    datamodule, module = build_module(cfg)
    callbacks: list[Callback] = [*_instantiate_list(cfg.get("callbacks")), RunDescription(description)]
    loggers: list[Logger] = _instantiate_list(cfg.get("logger"))
    trainer: Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                               plugins=[AtomicCheckpointIO()])
    if loggers:
        params = OmegaConf.to_container(cfg, resolve=True)
        params["git"] = description["git"]
        for logger in loggers:
            logger.log_hyperparams(params)
    return datamodule, module, trainer


def require_component_masks(cfg: DictConfig, datamodule: LightningDataModule | None = None) -> None:
    """Training with component experts needs the datasets' component masks (the data side's
    policy: :meth:`data_modules.datamodule.AnomalyDataModule.require_component_masks`)."""
    experts = cfg.model.get("num_component_experts", 0)
    if experts:
        (datamodule or hydra.utils.instantiate(cfg.dataset)).require_component_masks(experts)
