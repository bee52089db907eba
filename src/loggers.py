"""Experiment loggers built from config: W&B that never waits for a network it does not have."""

from __future__ import annotations

import logging
import netrc
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

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


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    offline: bool | None = None,
    init_timeout: float = 60.0,
    **kwargs,
) -> WandbLogger:
    """Lightning's ``WandbLogger``; ``offline=None`` decides with :func:`wandb_offline_by_default`.

    Online runs give up after ``init_timeout`` seconds instead of waiting for a network; offline
    runs write ``<save_dir>/wandb/offline-run-*`` (upload later with ``wandb sync``).
    """
    import wandb

    offline = wandb_offline_by_default(offline)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    log.info("W&B logger %s (project %s, dir %s)", "offline" if offline else "online", project, save_dir)
    return WandbLogger(
        project=project, name=name, save_dir=save_dir, offline=offline,
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
