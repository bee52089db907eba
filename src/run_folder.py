"""One run, one folder: a lock file for the live run and a record of the run that used the folder.

* ``<folder>/.lock`` (pid and host of the live process) makes a second run in the same folder
  stop at once; a lock whose process no longer runs on this host is stale and taken over.
* ``mode=predict`` holds its ``predict.output_dir`` the same way (:mod:`src.modes.predict`) and
  never rewrites a finished prediction there (:mod:`src.prediction_writer`).
* ``<folder>/run.json`` says which run (mode, command, start time) wrote the folder.
* A run that finds an earlier run's results there (checkpoints, ``results.json``, predictions,
  an export) refuses to start, unless it resumes that run (``mode=train ckpt_path=last``, or a
  ``mode=predict`` that was stopped before it finished) or
  ``overwrite=true`` asks to start afresh (the earlier checkpoints and logs are then deleted, so
  that they cannot be mixed with the new ones). A run that stopped before writing any of them
  leaves nothing to protect.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from src.errors import ConfigError

log = logging.getLogger(__name__)

LOCK = ".lock"
RECORD = "run.json"
# What marks a folder as holding a run's results.
RUN_FILES = ("checkpoints", "results.json", "predictions", "model_final.pth")
# What overwrite=true deletes: what a new run would otherwise mix with its own.
REPLACED = (RECORD, "checkpoints", "csv", "wandb", "tensorboard", "predictions", "calibration.json",
            "results.json", "results.csv")


# How a run of each mode continues the run of its folder, for the refusal above.
RESUME_HINTS = {"train": "resume its training with mode=train ckpt_path=last, ",
                "predict": "finish a stopped prediction by running it again (a folder with predictions.partial.jsonl "
                           "continues), "}


class RunFolderError(ConfigError):
    """The run folder is in use or holds another run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def acquire_lock(folder: Path, setting: str = "paths.output_dir") -> Path:
    """Create ``folder/.lock`` for this process; a live holder is a :class:`RunFolderError`
    naming ``setting``, the config key that chose the folder."""
    path = folder / LOCK
    host = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):  # being written right now, or damaged
                if time.time() - path.stat().st_mtime < 10:
                    owner = {"pid": -1, "host": "?"}
                else:
                    owner = {"pid": 0, "host": host}
            pid = owner.get("pid", -1)
            if pid == 0 or (owner.get("host") == host and pid > 0 and not _alive(pid)):
                log.warning("Removing the stale lock %s (process %s is no longer running)", path, owner.get("pid"))
                path.unlink(missing_ok=True)
                continue
            raise RunFolderError(
                f"{setting}={folder} is in use by another live run (pid {owner.get('pid')} on "
                f"{owner.get('host')}, lock file {path}): wait for it to finish, or choose another {setting}"
                + ("" if owner.get("host") == host else f"; if that run is gone, delete {path}")
            )
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        return path
    raise RunFolderError(f"could not lock {setting}={folder}: {path} keeps reappearing")


def holds_run(folder: Path) -> list[str]:
    """The files of an earlier run in ``folder`` (empty: none)."""
    return [name for name in RUN_FILES if (folder / name).is_file()
            or (folder / name).is_dir() and any((folder / name).iterdir())]


@contextmanager
def claim_run_folder(folder: str | Path, mode: str, resume: bool = False, overwrite: bool = False,
                     record: bool = True) -> Iterator[Path]:
    """Hold ``folder`` for this run: lock it, check it holds no other run, write ``run.json``.

    ``record=False`` (modes that write no run files, e.g. ``prepare``, ``segment``) only locks.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(folder)
    try:
        earlier = holds_run(folder) if record else []
        if earlier and overwrite:
            log.warning("overwrite=true: deleting the earlier run's files in %s", folder)
            for name in REPLACED:
                target = folder / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        elif earlier and not resume:
            raise RunFolderError(
                f"paths.output_dir={folder} already holds a run ({', '.join(earlier)}): choose another "
                f"paths.output_dir (the default is a new folder per run), {RESUME_HINTS.get(mode, '')}"
                "or replace it with overwrite=true"
            )
        if record:
            (folder / RECORD).write_text(json.dumps({
                "mode": mode, "command": sys.argv, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": bool(earlier and resume),
            }, indent=2))
        yield folder
    finally:
        lock.unlink(missing_ok=True)
