"""One run, one folder: unique default folders, a lock against a second live run, no silent reuse
of a folder that holds a run, resumed W&B runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.loggers import previous_wandb_run, wandb_logger
from src.run_folder import LOCK, RunFolderError, claim_run_folder
from tests.conftest import ROOT, compose_cfg, tiny_model

_HOLDER = """
import sys, time
from src.run_folder import claim_run_folder
with claim_run_folder(sys.argv[1], "train"):
    print("locked", flush=True)
    time.sleep(120)
"""


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def exported(tmp_path) -> Path:
    """A small Lightning-format checkpoint (mode=export needs nothing else: a quick run)."""
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in tiny_model().state_dict().items()}, "global_step": 1}, path)
    return path


def test_a_second_live_run_in_the_folder_stops_at_once_and_a_stale_lock_is_taken_over(exported, tmp_path):
    folder = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = cli("mode=export", f"ckpt_path={exported}", f"paths.output_dir={folder}")
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 1
        assert f"paths.output_dir={folder} is in use by another live run (pid {holder.pid}" in stderr
        assert "Traceback" not in stderr and not (folder / "model_final.pth").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    assert (folder / LOCK).exists()
    with claim_run_folder(folder, "export"):  # the dead process's lock is stale
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK).exists()


def test_a_folder_holding_a_run_is_not_reused_unless_resumed_or_overwritten(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step_000005.ckpt").write_bytes(b"x")
    (folder / "csv").mkdir()
    with pytest.raises(RunFolderError, match=r"already holds a run \(checkpoints\).*ckpt_path=last.*overwrite=true"):
        with claim_run_folder(folder, "train"):
            pass
    assert not (folder / LOCK).exists()
    with claim_run_folder(folder, "train", resume=True):
        assert json.loads((folder / "run.json").read_text())["resumed"] is True
    assert (folder / "checkpoints" / "step_000005.ckpt").exists()
    with claim_run_folder(folder, "train", overwrite=True):
        pass
    assert not (folder / "checkpoints").exists() and not (folder / "csv").exists()
    # A run that stopped before writing results leaves nothing to protect; modes without results only lock.
    with claim_run_folder(folder, "train"):
        pass
    (folder / "results.json").write_text("{}")
    with claim_run_folder(folder, "segment", record=False):
        pass


def test_overwrite_flag_is_in_the_config_and_resuming_from_a_file_of_the_folder_counts_as_resuming(tmp_path):
    from src.entry import resumes_its_folder

    assert compose_cfg(["overwrite=true"]).overwrite is True
    own = tmp_path / "run" / "checkpoints" / "step_000005.ckpt"
    for ckpt_path, mode, resumes in (("last", "train", True), (own, "train", True), (tmp_path / "other.ckpt", "train", False),
                                     (own, "test", False), (None, "train", False)):
        cfg = compose_cfg([f"mode={mode}", f"ckpt_path={ckpt_path or 'null'}", f"paths.output_dir={tmp_path / 'run'}"])
        assert resumes_its_folder(cfg) is resumes, (ckpt_path, mode)


@pytest.mark.slow
def test_default_run_folders_are_unique_within_one_second(exported, tmp_path):
    runs = [cli("mode=export", f"ckpt_path={exported}", f"paths.log_dir={tmp_path}") for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr[-2000:]
    folders = sorted((tmp_path / "anomalymoe" / "runs").iterdir())  # started together, usually in one second
    assert len(folders) == 2 and all((f / "model_final.pth").is_file() for f in folders)
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d{6}", f.name) for f in folders)


def test_wandb_continues_the_run_of_its_folder(tmp_path):
    assert previous_wandb_run(tmp_path) is None
    for name in ("offline-run-20260101_100000-first1", "offline-run-20260102_100000-second2", "latest-run"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert previous_wandb_run(tmp_path) == "second2"
    logger = wandb_logger("anomalymoe", str(tmp_path), offline=True)
    assert logger._wandb_init["id"] == "second2" and logger._wandb_init["resume"] == "allow"
    fresh = wandb_logger("anomalymoe", str(tmp_path / "new"), offline=True)
    assert "id" not in fresh._wandb_init or fresh._wandb_init["id"] is None
