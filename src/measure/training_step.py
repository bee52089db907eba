"""Seconds and peak memory of the Lightning module's real training step, in a ``lightning.Trainer``."""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack

import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader

from src.measure.timing import peak_memory, synchronize
from src.module import AnomalyMoEModule


class StepTimer(Callback):
    """Seconds of every training step and the peak memory of step ``last_step``."""

    def __init__(self, device: torch.device, last_step: int) -> None:
        self.device, self.last_step = device, last_step
        self.seconds: list[float] = []
        self.memory: dict = {}
        self._stack = ExitStack()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.last_step:
            self.memory = self._stack.enter_context(peak_memory(self.device))
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        if batch_idx == self.last_step:
            self._stack.close()


def time_training(module: AnomalyMoEModule, batch: dict, device: torch.device, precision: str, warmup: int,
                  iterations: int) -> dict:
    """Median seconds of the module's real training step (a ``lightning.Trainer`` fitting on
    ``batch`` again and again) after ``warmup`` steps, and the peak memory of one more step."""
    steps = warmup + iterations + 1
    timer = StepTimer(device, last_step=steps - 1)
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
        precision="bf16-mixed" if precision == "bf16" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    return {"seconds": statistics.median(timer.seconds[warmup : warmup + iterations]),
            "peak_bytes": timer.memory["peak_bytes"]}
