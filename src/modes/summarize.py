"""mode=summarize: the summary of finished runs (:mod:`src.summary`), made after the fact.

``python run.py mode=summarize summarize.dir=<multirun folder>`` writes ``summary.md``,
``summary.csv`` (and ``summary_seeds.csv``, ``summary.png`` where they apply) into that folder,
exactly as the end of a multirun does: for SLURM jobs that finished after the launcher exited, to
summarise again, or (``summarize.dir=[<run>,<run>]``) to compare runs not started together. Reads
the folders only: no model, no data, no run folder of its own is taken. With W&B among the
loggers (``logger=wandb``) the tables are logged as well.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from src.errors import ConfigError
from src.summary import SummaryInputError, summarize_folders, wandb_settings


def run(cfg: DictConfig) -> float | None:
    given = cfg.summarize.dir
    if not given:
        raise ConfigError("mode=summarize needs summarize.dir=<a multirun folder, e.g. logs/anomalymoe/multiruns/"
                          "<time>>, or a list of run folders: summarize.dir=[<folder>,<folder>]")
    folders = list(given) if isinstance(given, ListConfig) else [given]
    output = cfg.summarize.output or (folders[0] if len(folders) == 1 else cfg.paths.output_dir)
    try:
        summarize_folders(folders, Path(output).expanduser(), wandb_settings(cfg))
    except SummaryInputError as err:
        raise ConfigError(f"summarize.dir: {err}") from None
    return None
