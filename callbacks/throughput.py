"""Images per second where users look: the training progress bar and the logs (every logger,
W&B included), and once for the test; on CUDA also the peak memory of the process.

The training rate is over the last ``window`` steps, wall time between the ends of steps (data
loading included), so a single slow step (a checkpoint, a validation) moves it little.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch
from lightning import Callback

log = logging.getLogger(__name__)


def _images(batch) -> int:
    image = batch.get("image") if isinstance(batch, dict) else None
    return int(image.shape[0]) if torch.is_tensor(image) else 0


def _peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class Throughput(Callback):
    """``train/images_per_s`` (progress bar, every step), ``test/images_per_s`` (once);
    ``train/peak_memory_mib`` and ``test/peak_memory_mib`` on CUDA."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"callbacks.throughput.window={window}; use 1 or more steps")
        self.window = window
        self._ends: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._test_start: float | None = None
        self._test_images = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._ends.clear()
        self._ends.append((time.perf_counter(), 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._ends.append((time.perf_counter(), _images(batch)))
        (start, _), *steps = self._ends
        seconds = steps[-1][0] - start
        if seconds > 0:
            rate = sum(n for _, n in steps) / seconds
            pl_module.log("train/images_per_s", rate, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        peak = _peak_memory_mib(pl_module.device)
        if peak is not None:
            pl_module.log("train/peak_memory_mib", peak, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._test_start, self._test_images = time.perf_counter(), 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._test_images += _images(batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self._test_start is None or not self._test_images:
            return
        seconds = time.perf_counter() - self._test_start
        rate = self._test_images / seconds
        logs = {"test/images_per_s": rate}
        peak = _peak_memory_mib(pl_module.device)
        if peak is not None:
            logs["test/peak_memory_mib"] = peak
        pl_module.log_dict(logs, sync_dist=False, rank_zero_only=True, add_dataloader_idx=False)
        log.info("Test: %d images in %.1f s (%.1f images/s, model and evaluator)", self._test_images, seconds, rate)
