"""Checkpoints of a run: periodic and final ones, the run description inside each, and the one
written when training is interrupted."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.errors import ConfigError

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """``step_*.ckpt`` every ``every_n_train_steps`` during training; ``last.ckpt`` once, when the
    fit ends: the final weights, with the calibration the module computes for them just before.

    So ``last.ckpt`` is always the final model, whatever ``max_steps`` is, and no file is
    rewritten afterwards (``enable_version_counter=False``: never ``last-v1.ckpt``).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self._final = False

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        if self._final:  # not during training: last.ckpt is only the final model
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.save_last or trainer.fast_dev_run:
            return
        if hasattr(pl_module, "calibrate") and trainer.datamodule is not None:
            pl_module.calibrate(trainer.datamodule)
        self._final = True
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._final = False
        pl_module.checkpoint_info = {"path": self.last_model_path, "global_step": trainer.global_step}
        if trainer.is_global_zero:
            log.info("Saved the final model (step %d) to %s", trainer.global_step, self.last_model_path)


def training_data(samples: Sequence) -> dict:
    """What identifies a run's training images: their number and a digest of their class keys,
    types and file names (not their folder, so that a dataset moved to another disk is the same)."""
    names = sorted(f"{s.class_key}/{s.defect_type}/{s.image_path.name}" for s in samples)
    return {"num_images": len(names), "digest": hashlib.sha1("\n".join(names).encode()).hexdigest()}


class RunDescription(Callback):
    """Puts the run description (:func:`src.build.describe_run`), the module's class keys and the
    training images (:func:`training_data`) into every checkpoint (key ``anomalymoe``), so that a
    checkpoint can be used on its own; and refuses to resume training on other data.

    Resuming continues the epoch (its sampler position and order) and the schedule of the images
    the checkpoint was trained on: on other images it would fail inside the data loader or,
    worse, continue silently and mix two datasets in one run folder.
    """

    KEY = "anomalymoe"

    def __init__(self, description: dict) -> None:
        self.description = description
        self._data: tuple[int, dict] | None = None  # (id of the training set, training_data of it)

    def _training_data(self, trainer: Trainer) -> dict | None:
        train_set = getattr(trainer.datamodule, "train_set", None)
        if train_set is None or not hasattr(train_set, "samples"):
            return None
        if self._data is None or self._data[0] != id(train_set):
            self._data = (id(train_set), training_data(train_set.samples))
        return self._data[1]

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = {**self.description, "class_keys": list(getattr(pl_module, "class_keys", []))}
        data = self._training_data(trainer)
        if data is not None:
            checkpoint[self.KEY]["training_data"] = data

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        stored = checkpoint.get(self.KEY) or {}
        if trainer.state.fn != TrainerFn.FITTING or not stored.get("class_keys"):
            return
        keys, data = list(getattr(pl_module, "class_keys", [])), self._training_data(trainer)
        same_keys = stored["class_keys"] == keys
        if same_keys and (data is None or stored.get("training_data") in (None, data)):
            return
        def what(keys: list[str], data: dict | None) -> str:
            return f"classes {', '.join(keys)}" + (f" ({data['num_images']} training images)" if data else "")

        raise ConfigError(
            f"ckpt_path={trainer.ckpt_path} was trained on {what(stored['class_keys'], stored.get('training_data'))} "
            f"but this run reads {what(keys, data)}"
            + ("" if not same_keys else ", other images under the same class names") + ". Resuming training "
            "continues that run on its own images. To train on these images, start a new run: another "
            "paths.output_dir without ckpt_path; to resume the run, give it the data it was trained on."
        )


class InterruptCheckpoint(Callback):
    """Saves ``<dirpath>/interrupted.ckpt`` when training stops on SIGTERM or Ctrl-C.

    Lightning turns SIGTERM (cluster pre-emption, ``scancel``) into an exception raised between
    two steps on every process at once, so the checkpoint holds a complete step. Other
    exceptions are not saved: they can stop one process only, and a save waits for all of them.
    The file is removed when a later fit finishes, so ``ckpt_path=last`` never picks a stale one.
    (Lightning's ``OnExceptionCheckpoint`` also makes every ``fit()`` without a checkpoint look
    for one, which this project decides explicitly with ``ckpt_path=last``.)
    """

    FILENAME = "interrupted.ckpt"

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / self.FILENAME

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.warning("Training interrupted at step %d; saved %s (resume with ckpt_path=last)", trainer.global_step, self.path)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.path.is_file():
            self.path.unlink()
