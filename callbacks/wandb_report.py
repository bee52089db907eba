"""Test results to Weights & Biases: what the test side wrote to the run folder, as W&B tables
and images. A no-op without a ``WandbLogger``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def _cell(value: str) -> str | float | None:
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def read_table(path: Path) -> tuple[list[str], list[list]]:
    """A CSV file as (columns, rows), numbers as floats and empty cells as None."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], []
    return rows[0], [[_cell(v) for v in row] for row in rows[1:]]


class WandbTestReport(Callback):
    """After ``trainer.test``, logs from ``output_dir``:

    - every ``results*.csv`` as a W&B table ``test/<stem>`` (per-class, per-dataset, overall);
    - the anomaly-map panels ``overlays/<dataset>__<class>/*.png`` as ``test/overlays/<dataset>__<class>``;
    - every other figure (``*.png`` in ``output_dir`` or ``output_dir/figures``, e.g. the routing
      heat map) as ``test/figures/<stem>``.

    It must come after the callbacks that write those files (it is last in ``callbacks/default.yaml``).
    """

    def __init__(self, output_dir: str, max_panels_per_class: int = 6) -> None:
        self.output_dir = Path(output_dir)
        self.max_panels_per_class = max_panels_per_class

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        wandb_logger = loggers[0]
        step = trainer.global_step
        tables = sorted(self.output_dir.glob("results*.csv"))
        for path in tables:
            columns, rows = read_table(path)
            if rows:
                wandb_logger.log_table(key=f"test/{path.stem}", columns=columns, data=rows, step=step)
        panels = 0
        for folder in sorted(p for p in (self.output_dir / "overlays").glob("*") if p.is_dir()):
            images = sorted(folder.glob("*.png"))[: self.max_panels_per_class]
            if images:
                wandb_logger.log_image(key=f"test/overlays/{folder.name}", images=[str(p) for p in images],
                                       caption=[p.stem for p in images], step=step)
                panels += len(images)
        figures = sorted(self.output_dir.glob("*.png")) + sorted((self.output_dir / "figures").glob("*.png"))
        for path in figures:
            wandb_logger.log_image(key=f"test/figures/{path.stem}", images=[str(path)], step=step)
        log.info("W&B: %d tables, %d anomaly-map panels, %d figures from %s", len(tables), panels, len(figures),
                 self.output_dir)
