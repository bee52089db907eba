"""A progress bar that counts training steps of ``trainer.max_steps`` ("Step 15/400").

Training runs for ``max_steps`` with ``max_epochs=-1``, so Lightning's own bar reads
``Epoch 15/-2`` and restarts at every epoch; this one runs once from 0 to ``max_steps``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimiser steps of ``max_steps`` during training."""

    def _max_steps(self) -> int | None:
        steps = self.trainer.max_steps
        return steps if steps and steps > 0 else None

    @property
    def total_train_batches(self) -> int | float:
        return self._max_steps() or super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "Training steps" if self._max_steps() else super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._max_steps() and self.train_progress_bar_id is not None and self.progress is not None:
            return  # one bar over all epochs
        super().on_train_epoch_start(trainer, pl_module)
        if self._max_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts where it stopped

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._max_steps():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        # Lightning's own update would first set the bar to the batch index of the epoch; the bar
        # moves only forward, by optimiser steps, so its speed column is right.
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
