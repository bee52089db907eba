"""Checkpoints for interrupted runs and how a run finds the checkpoint to resume from."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


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
        log.warning("Training interrupted at step %d; saved %s (resume with ckpt_path=last)", trainer.global_step, self.path)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.path.is_file():
            self.path.unlink()


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint a run in ``output_dir`` left for resuming, or None.

    Looks at ``checkpoints/last.ckpt``, ``checkpoints/interrupted.ckpt`` and Lightning's SLURM
    requeue checkpoints ``hpc_ckpt_<n>.ckpt`` (written to the run folder on the requeue signal).
    """
    output_dir = Path(output_dir)
    candidates = [output_dir / "checkpoints" / "last.ckpt", output_dir / "checkpoints" / InterruptCheckpoint.FILENAME]
    candidates += output_dir.glob("hpc_ckpt_*.ckpt")
    found = [p for p in candidates if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
