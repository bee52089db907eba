"""Write the test results of a run: ``results.json``, ``results.csv``, printed tables, the routing
figure and the normal-image calibration."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from src.evaluation.report import expert_names, markdown_tables, write_report, write_score_rows
from src.evaluation.visualize import routing_figure

log = logging.getLogger(__name__)


class ResultsWriter(Callback):
    """After ``trainer.test``: write ``pl_module.test_report`` (built in ``on_test_epoch_end``),
    ``scores.csv`` (one row per test image: score, decision, routing), ``routing.png`` and, when this run computed the calibration, ``calibration.json`` (a copy of
    what the checkpoint holds, for reading)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.report: dict | None = None

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.report = getattr(pl_module, "test_report", None)
        if not self.report:
            log.warning("No test results to write (empty test set?).")
            return
        paths = write_report(self.report, self.output_dir)
        if getattr(pl_module, "test_scores", None):
            names = expert_names(pl_module.net.num_experts)
            paths.append(write_score_rows(pl_module.test_scores, self.output_dir / "scores.csv", names))
        routing = self.report.get("routing")
        if routing:
            rows = list(routing["classes"])
            fractions = np.array([routing["classes"][k]["selected"] for k in rows])
            paths.append(routing_figure(fractions, rows, routing["experts"], self.output_dir / "routing.png"))
        if pl_module.calibration is not None and pl_module.calibration_source == "computed":
            paths.append(pl_module.calibration.save(self.output_dir / "calibration.json"))
        print("\n" + markdown_tables(self.report) + "\n", flush=True)
        log.info("Results written to %s", ", ".join(str(p) for p in paths))
