"""Experiment loggers built from config: W&B that never waits for a network it does not have
and continues the run of its folder, a CSV logger that keeps the rows of earlier attempts."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


def wandb_key_configured() -> bool:
    """True when W&B has an API key: ``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_offline_by_default(offline: bool | None) -> bool:
    """``offline=None``: offline unless ``WANDB_MODE=online``, or a key is configured and
    ``WANDB_MODE`` does not say ``offline``/``disabled``."""
    if offline is not None:
        return offline
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    return not (mode == "online" or wandb_key_configured())


def previous_wandb_run(save_dir: str | Path) -> str | None:
    """The id of the newest W&B run under ``<save_dir>/wandb`` (``[offline-]run-<time>-<id>``), or None."""
    runs = sorted((Path(save_dir) / "wandb").glob("*run-*-*"), key=lambda p: p.name.removeprefix("offline-"))
    ids = [m.group(1) for p in runs if p.is_dir() and (m := re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(\w+)", p.name))]
    return ids[-1] if ids else None


def multirun_name() -> str | None:
    """The multirun folder's name when this process runs a job of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    offline: bool | None = None,
    init_timeout: float = 60.0,
    group: str | None = None,
    **kwargs,
) -> WandbLogger:
    """Lightning's ``WandbLogger``; ``offline=None`` decides with :func:`wandb_offline_by_default`.

    Online runs give up after ``init_timeout`` seconds instead of waiting for a network; offline
    runs write ``<save_dir>/wandb/offline-run-*`` (upload later with ``wandb sync``). A run folder
    that already holds a W&B run (a resumed training, ``ckpt_path=last``) continues that run.
    ``group=None`` groups the jobs of one multirun under its folder's name (:func:`multirun_name`).
    """
    import wandb

    offline = wandb_offline_by_default(offline)
    group = group or multirun_name()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    previous = previous_wandb_run(save_dir)
    if previous and "id" not in kwargs:
        log.info("W&B: continuing run %s of %s", previous, save_dir)
        kwargs.update(id=previous, resume="allow")
    log.info("W&B logger %s (project %s, dir %s)", "offline" if offline else "online", project, save_dir)
    return WandbLogger(
        project=project, name=name, save_dir=save_dir, offline=offline, group=group,
        settings=wandb.Settings(init_timeout=init_timeout, silent=True), **kwargs,
    )


def git_commit(root: str | Path) -> dict[str, str | bool | None]:
    """``{"commit": sha or None, "dirty": uncommitted changes?}`` of the repository at ``root``."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted.

    The columns are those of the file as it is when rows are saved, not as it was when the
    writer was made: another process may have written it since (the training processes of
    ``trainer=ddp_sim`` write it, then the main process appends the test metrics).
    """

    def _file_columns(self) -> list[str]:
        if not os.path.isfile(self.metrics_file_path):
            return []
        with open(self.metrics_file_path, newline="") as f:
            return next(csv.reader(f), [])

    def _check_log_dir_exists(self) -> None:
        self.metrics_keys = sorted(self._file_columns())

    def save(self) -> None:
        if not self.metrics:
            return
        columns = self._file_columns()
        keys = set(columns) | set(self.metrics_keys) | set().union(*self.metrics)
        if columns and keys == set(columns):
            self.metrics_keys = columns  # append in the file's own column order
        else:
            self.metrics_keys = sorted(keys)
            if columns:
                self._rewrite_with_new_header(self.metrics_keys)
        with open(self.metrics_file_path, "a" if columns else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            if not columns:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` keeps the rows of earlier attempts of the run (a resumed
    run appends; new columns rewrite the header and keep every row)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
