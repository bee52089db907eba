"""mode=export: write a checkpoint's network with the original's key names (``model_final.pth``).

The file loads into the original code (``model.load_state_dict(torch.load(path))``) and back into
this project (``mode=test ckpt_path=<file>``), so results can be compared side by side. Like the
original's file it holds only the network: no optimiser or CLUB-estimator state.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from src.models.checkpoint import CheckpointError, ours_to_original, read_state_file

log = logging.getLogger(__name__)


def export_original(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Read a Lightning ``.ckpt`` of this project and save its network under the original's key names."""
    state = read_state_file(Path(ckpt_path).expanduser(), "ckpt_path")
    net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not net:
        raise CheckpointError(
            f"{ckpt_path} holds no 'net.*' weights: mode=export reads a checkpoint written by mode=train "
            "(e.g. <run>/checkpoints/last.ckpt)"
        )
    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ours_to_original(net), out_path)
    return out_path


def run(cfg: DictConfig) -> None:
    """Export ``ckpt_path`` to ``export.path`` (default ``<run folder>/model_final.pth``)."""
    out = export_original(cfg.ckpt_path, cfg.export.path)
    log.info("Wrote %s (original key names) from %s", out, cfg.ckpt_path)
