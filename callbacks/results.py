"""Write the test results of a run: ``results.json``, ``results.csv`` and printed tables."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from src.evaluation.report import build_report, markdown_tables, write_report

log = logging.getLogger(__name__)


class ResultsWriter(Callback):
    """After ``trainer.test``: build the report from ``pl_module.test_results`` and write it."""

    def __init__(self, output_dir: str, protocol: str = "paper") -> None:
        self.output_dir = Path(output_dir)
        self.protocol = protocol
        self.report: dict | None = None

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.test_results:
            log.warning("No test results to write (empty test set?).")
            return
        self.report = build_report(pl_module.test_results, pl_module.class_keys, self.protocol)
        paths = write_report(self.report, self.output_dir)
        print("\n" + markdown_tables(self.report) + "\n", flush=True)
        log.info("Results written to %s", ", ".join(str(p) for p in paths))
