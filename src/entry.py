"""What ``run.py`` does with a composed config: check it, take the run folder, rebuild the model
from the checkpoint, run the selected ``mode``.

Each mode is a module ``src/modes/<mode>.py`` with ``run(cfg) -> float | None``. Everything that
can be checked cheaply (the mode, ``ckpt_path``, the run folder) is checked before a model or a
dataset is built. A mode that only reads finished runs (``summarize``) runs at once: it takes no
run folder and builds nothing.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
from contextlib import nullcontext
from pathlib import Path

from hydra.errors import CompactHydraException
from lightning import seed_everything
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from src.checkpoints import apply_checkpoint_config, find_resume_checkpoint, read_checkpoint
from src.config_checks import prepare_run
from src.console import quiet_lightning
from src.errors import ConfigError, user_error
from src.inference import is_exported
from src.loggers import multirun_name
from src.prediction_writer import unfinished_prediction
from src.run_folder import claim_run_folder

log = logging.getLogger(__name__)

CHECKPOINT_MODES = {"test": "a .ckpt of this project or an original model_final.pth",
                    "predict": "a .ckpt of this project, an original model_final.pth or an exported model.onnx",
                    "export": "a .ckpt written by mode=train"}
RUN_MODES = ("train", "test", "predict", "export")  # the modes that write a run's files (run.json)
READING_MODES = ("summarize",)  # read other runs' folders: no run folder of their own, no model, no data
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process ended by the signal


class JobError(CompactHydraException):
    """A user error in one job of a multirun: that job fails (recorded in its ``job.json``), the
    other jobs run, and Hydra ends the sweep with this message alone, not a traceback."""


def available_modes() -> list[str]:
    """Every ``mode=`` value: one module with a ``run(cfg)`` function per mode in ``src/modes``."""
    import src.modes

    return sorted(m.name for m in pkgutil.iter_modules(src.modes.__path__) if not m.name.startswith("_"))


def command_line_overrides(cfg: DictConfig) -> list[str]:
    """The overrides given on the command line (Hydra's ``overrides.task``)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    if "hydra" in cfg and OmegaConf.select(cfg, "hydra.overrides.task") is not None:
        return list(cfg.hydra.overrides.task)
    return []


def check_ckpt_path(cfg: DictConfig) -> None:
    """``ckpt_path`` is given where the mode needs one and names an existing file (or ``last``)."""
    ckpt_path = cfg.get("ckpt_path")
    if cfg.mode in CHECKPOINT_MODES and not ckpt_path:
        raise ConfigError(f"mode={cfg.mode} needs ckpt_path=<{CHECKPOINT_MODES[cfg.mode]}>")
    if ckpt_path == "last":
        if cfg.mode != "train":
            raise ConfigError(f"ckpt_path=last resumes training (mode=train); mode={cfg.mode} needs a file")
        return
    if ckpt_path and not Path(ckpt_path).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist"
                                + ("; give a .ckpt file or ckpt_path=last" if cfg.mode == "train" else ""))


def resumes_its_folder(cfg: DictConfig) -> bool:
    """Training that continues the run of ``paths.output_dir`` (``ckpt_path=last`` or one of its
    files), or a prediction that continues an unfinished one (:mod:`src.prediction_writer`)."""
    if cfg.mode == "predict":
        return unfinished_prediction(cfg.predict.output_dir)
    ckpt_path = cfg.get("ckpt_path")
    if cfg.mode != "train" or not ckpt_path:
        return False
    folder = Path(cfg.paths.output_dir).expanduser().resolve()
    return ckpt_path == "last" or Path(ckpt_path).expanduser().resolve().is_relative_to(folder)


def use_checkpoint(cfg: DictConfig) -> None:
    """Read ``ckpt_path`` (``last``: the newest checkpoint of the run folder that loads) and build
    the model it describes; ``cfg.ckpt_path`` becomes the file used (None: nothing to resume)."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path or cfg.mode not in RUN_MODES:
        return
    if cfg.mode == "predict" and is_exported(ckpt_path):
        return  # an exported model (mode=export export.format=onnx or torch) describes itself: src.inference reads it
    if ckpt_path == "last":
        checkpoint = find_resume_checkpoint(cfg.paths.output_dir)
        if checkpoint is None:
            log.info("ckpt_path=last: no checkpoint under %s yet; training from the start", cfg.paths.output_dir)
        else:
            log.info("ckpt_path=last: resuming from %s (step %s)", checkpoint.path, checkpoint.global_step)
    else:
        checkpoint = read_checkpoint(ckpt_path)
        if cfg.mode == "train" and checkpoint.kind != "lightning":
            raise ConfigError(f"ckpt_path={ckpt_path} is not a training checkpoint of this project; mode=train "
                              "resumes from a .ckpt it wrote (model.backbone.weights= loads backbone weights)")
    with open_dict(cfg):
        cfg.ckpt_path = str(checkpoint.path) if checkpoint else None
    if checkpoint is not None and (cfg.mode != "export" or cfg.export.get("format", "original") != "original"):
        apply_checkpoint_config(cfg, checkpoint, command_line_overrides(cfg))


def save_config(cfg: DictConfig) -> None:
    """The resolved config next to the results, whatever ``paths.output_dir`` is."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # Hydra's own node, when composed with it
    (out / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))


def run_task(cfg: DictConfig) -> float | None:
    """Check, take the run folder, seed, save the config, run ``src.modes.<mode>.run(cfg)``
    (Lightning's console lines once, without its product tips: :mod:`src.console`).

    Returns the mode's metric. SIGTERM during training (after ``interrupted.ckpt`` is written)
    ends the process with exit code 143, so a scheduler sees that the job did not finish.
    """
    quiet_lightning()
    if cfg.mode not in available_modes():
        raise ConfigError(f"mode={cfg.mode!r} is not one of {available_modes()}")
    if cfg.mode in READING_MODES:
        return importlib.import_module(f"src.modes.{cfg.mode}").run(cfg)
    check_ckpt_path(cfg)
    main_process = rank_zero_only.rank == 0  # processes started by a DDP launcher share the folder
    if not main_process:  # they would repeat every message of the main process; errors still show
        logging.getLogger().setLevel(logging.ERROR)
    claim = claim_run_folder(cfg.paths.output_dir, cfg.mode, resume=resumes_its_folder(cfg),
                             overwrite=bool(cfg.get("overwrite")), record=cfg.mode in RUN_MODES)
    try:
        with claim if main_process else nullcontext():
            use_checkpoint(cfg)
            prepare_run(cfg)  # config values checked and fitted to the machine before anything heavy
            if cfg.get("seed") is not None:
                seed_everything(cfg.seed, workers=True)
            if main_process:
                save_config(cfg)
            return importlib.import_module(f"src.modes.{cfg.mode}").run(cfg)
    except SIGTERMException:
        log.error("Stopped by SIGTERM; resume with ckpt_path=last")
        raise SystemExit(EXIT_SIGTERM) from None
    finally:
        _close_wandb()


def run_task_reporting_user_errors(cfg: DictConfig) -> float | None:
    """:func:`run_task` for ``run.py``: a user error (:mod:`src.errors`) is printed as one message
    and ends the process with exit code 1; ``HYDRA_FULL_ERROR=1`` keeps the traceback. In a
    multirun it ends only its job (:class:`JobError`): Hydra runs the other jobs, then exits with 1."""
    try:
        return run_task(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", cause)
        if multirun_name() is not None:
            raise JobError(str(cause)) from err
        print(f"\nError: {cause}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _close_wandb() -> None:
    """Always finish a W&B run, so one failed job does not break the next job of a multirun."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
