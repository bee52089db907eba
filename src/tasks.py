"""What ``run.py`` does: build objects from the config and run the selected ``mode``.

Each mode is a module ``src/modes/<mode>.py`` with ``run(cfg) -> float | None``; the shared
building blocks (components from the config, checkpoint loading) live here.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path

import hydra
import torch
from lightning import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from src.config_checks import prepare_run
from src.loggers import git_commit
from src.models.anomalymoe import AnomalyMoE
from src.models.backbone import WEIGHTS_DEFERRED
from src.models.checkpoint import check_and_load, check_expert_counts, original_to_ours, read_state_file
from src.module import AnomalyMoEModule

log = logging.getLogger(__name__)


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


def build_components(cfg: DictConfig) -> tuple[LightningDataModule, AnomalyMoEModule, Trainer]:
    """Datamodule, Lightning module and trainer from the composed config."""
    datamodule, module = build_module(cfg)
    callbacks: list[Callback] = _instantiate_list(cfg.get("callbacks"))
    loggers: list[Logger] = _instantiate_list(cfg.get("logger"))
    trainer: Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if loggers:
        params = OmegaConf.to_container(cfg, resolve=True)
        params["git"] = git_commit(Path(__file__).resolve().parents[1])
        for logger in loggers:
            logger.log_hyperparams(params)
    return datamodule, module, trainer


def require_component_masks(cfg: DictConfig, datamodule: LightningDataModule | None = None) -> None:
    """Training with component experts needs the datasets' component masks (the data side's
    policy: :meth:`data_modules.multi.MultiSourceDataModule.require_component_masks`)."""
    experts = cfg.model.get("num_component_experts", 0)
    if experts:
        (datamodule or hydra.utils.instantiate(cfg.dataset)).require_component_masks(experts)


def load_weights(module: AnomalyMoEModule, path: str | Path) -> str:
    """Load a Lightning ``.ckpt`` of this project or an original-format state dict.

    Returns which format it was. Both paths are strict: every key must match. A Lightning
    checkpoint's normal-image calibration (if any) is loaded too.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist")
    if path.suffix == ".ckpt":  # our own Lightning checkpoints (trusted pickles)
        raw = torch.load(path, map_location="cpu", weights_only=False)
        check_and_load(module, raw["state_dict"], f"Lightning checkpoint {path}")
        module.on_load_checkpoint(raw)
        return "lightning"
    state = original_to_ours(read_state_file(path))
    check_expert_counts(state, module.net.expert_counts(), f"checkpoint {path}")
    check_and_load(module.net, state, f"original-format checkpoint {path}")
    return "original"


def run_test(trainer: Trainer, module: AnomalyMoEModule, datamodule: LightningDataModule, cfg: DictConfig,
             calibrate: bool = False) -> None:
    """``trainer.test`` on the datamodule's test set.

    The normal-image calibration (:mod:`src.evaluation.calibration`) is computed first, in the
    same loop (dataloader 0 = normal training images), when ``calibrate`` is set,
    ``evaluation.recalibrate`` is true, or the inductive protocol needs it and the module has
    none. The ``ResultsWriter`` then saves it as ``calibration.json`` in the run folder.
    """
    datamodule.prepare_data()
    datamodule.setup("test")
    module.class_keys = list(datamodule.test_class_keys)
    needed = module.evaluator.protocol == "inductive" and module.calibration is None
    module.calibrate_on_test = calibrate or bool(cfg.evaluation.recalibrate) or needed
    loaders = [datamodule.test_dataloader()]
    if module.calibrate_on_test:
        loaders.insert(0, datamodule.normal_dataloader(module.calibrator.images_per_class))
    log.info("Testing with the %s protocol%s", module.evaluator.protocol,
             ", after calibrating on normal training images" if module.calibrate_on_test else "")
    trainer.test(module, dataloaders=loaders, verbose=False)  # the ResultsWriter prints the tables


def mean_metric(trainer: Trainer, name: str = "image_auroc") -> float | None:
    for callback in trainer.callbacks:
        report = getattr(callback, "report", None)
        if report:
            return report["mean"].get(name)
    return None


def save_config(cfg: DictConfig) -> None:
    """The resolved config next to the results, whatever ``paths.output_dir`` is."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def available_modes() -> list[str]:
    """Every ``mode=`` value: one module with a ``run(cfg)`` function per mode in ``src/modes``."""
    import src.modes

    return sorted(m.name for m in pkgutil.iter_modules(src.modes.__path__) if not m.name.startswith("_"))


def run_task(cfg: DictConfig) -> float | None:
    """Seed, save the resolved config, run ``src.modes.<mode>.run(cfg)``; returns its metric."""
    if cfg.mode not in available_modes():
        raise ValueError(f"mode={cfg.mode!r} is not one of {available_modes()}")
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    prepare_run(cfg)  # config values checked and fitted to the machine before anything heavy
    save_config(cfg)
    try:
        return importlib.import_module(f"src.modes.{cfg.mode}").run(cfg)
    finally:
        _close_wandb()


def _close_wandb() -> None:
    """Always finish a W&B run, so one failed job does not break the next job of a multirun."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
