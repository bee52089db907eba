"""Checkpoints of a run (Lightning ``.ckpt`` files this project writes): reading them safely, the run description they carry, rebuilding the
config from it, writing them atomically and finding the one to resume from.

Every Lightning checkpoint this project writes holds, besides Lightning's own state:

* ``anomalymoe``: the run description (:func:`src.build.describe_run`): the ``model`` config,
  the preprocessing (``image_size``, ``resize``, normalisation ``mean``/``std``), the class keys
  (``<dataset>/<class>``), the git commit and the dataset's name;
* ``calibration``: the normal-image calibration of the final weights (``last.ckpt``);
* ``segmentation``: each class's part prototypes and the segmentation settings, when the model
  was trained on ``mode=segment`` masks (:class:`src.segment.online.PartSegmentation`): new
  images are segmented like the training and test images.

Files are only ever read with ``torch.load(..., weights_only=True)``
(:func:`src.models.weight_formats.load_file`): a checkpoint is data, never code. Weights in other
formats (Meta's DINOv2 ``.pth``, timm files, the original AnomalyMoE state dict) are mapped by
:mod:`src.models.weight_formats`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from callbacks.resume import RunDescription
from src.errors import ConfigError
from src.evaluation.calibration import Calibration
from src.models.backbone import WEIGHTS_DEFERRED
from src.models.weight_formats import (
    CheckpointError,
    check_and_load,
    check_expert_counts,
    load_file,
    original_to_ours,
    state_dict_of,
)
from src.segment.online import PartSegmentation

log = logging.getLogger(__name__)

DESCRIPTION_KEY = RunDescription.KEY
# Model settings that change how the model runs, not what it is: they may differ from the checkpoint.
RUNTIME_MODEL_KEYS = ("backbone.weights", "dispatch", "student_strip_rows")
PREPROCESSING_KEYS = ("image_size", "resize")  # dataset.<key>; mean and std are fixed (ImageNet)
INTERRUPTED = "interrupted.ckpt"


@dataclass
class Checkpoint:
    """A checkpoint file read with ``weights_only=True`` (tensors memory-mapped, not copied)."""

    path: Path
    kind: str  # "lightning": written by this project | "original": a state dict with the original's key names
    state_dict: dict[str, Tensor]
    contents: Mapping[str, Any]

    @property
    def description(self) -> dict | None:
        """The run description (None: an original-format file or an older checkpoint)."""
        return self.contents.get(DESCRIPTION_KEY) if self.kind == "lightning" else None

    @property
    def global_step(self) -> int | None:
        return self.contents.get("global_step") if self.kind == "lightning" else None

    @property
    def calibration(self) -> Calibration | None:
        data = self.contents.get("calibration") if self.kind == "lightning" else None
        return Calibration.from_dict(data) if data else None

    @property
    def segmentation(self) -> PartSegmentation | None:
        data = self.contents.get("segmentation") if self.kind == "lightning" else None
        return PartSegmentation.from_dict(data) if data else None


def read_checkpoint(path: str | Path, what: str = "ckpt_path") -> Checkpoint:
    """Read a checkpoint of this project or an original-format state dict; refuse anything else."""
    path = Path(path).expanduser()
    contents = load_file(path, what, mmap=True)
    if isinstance(contents, Mapping) and isinstance(contents.get("state_dict"), Mapping) and any(
        str(k).startswith("net.") for k in contents["state_dict"]
    ):
        return Checkpoint(path, "lightning", state_dict_of(contents, path, what), contents)
    return Checkpoint(path, "original", state_dict_of(contents, path, what), {})


def load_weights(module, checkpoint: Checkpoint, calibration: bool = True) -> None:
    """Load ``checkpoint`` into the Lightning module (strict: every key must match).

    A checkpoint of this project also brings its calibration (unless ``calibration=False``, e.g.
    ``evaluation.recalibrate=true``); the module remembers which file and step it holds.
    """
    if checkpoint.kind == "lightning":
        check_and_load(module, checkpoint.state_dict, f"checkpoint {checkpoint.path}")
        module.set_calibration(checkpoint.calibration if calibration else None, "checkpoint")
        module.segmentation = checkpoint.segmentation
    else:
        state = original_to_ours(checkpoint.state_dict)
        check_expert_counts(state, module.net.expert_counts(), f"checkpoint {checkpoint.path}")
        check_and_load(module.net, state, f"original-format checkpoint {checkpoint.path}")
    module.checkpoint_info = {"path": str(checkpoint.path), "global_step": checkpoint.global_step}


# --------------------------------------------------------------------------- config from a checkpoint
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def override_keys(overrides: list[str]) -> list[str]:
    """Config keys set on the command line (``+a.b=1`` -> ``a.b``; group choices ``model=tiny`` -> ``model``)."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]


def apply_checkpoint_config(cfg: DictConfig, checkpoint: Checkpoint, overrides: list[str]) -> None:
    """Rebuild the model as the checkpoint describes it (in place of the composed ``cfg.model``).

    A command-line override of an architecture key (``model.<key>=`` or ``model=<option>``) that
    contradicts the checkpoint is a :class:`ConfigError` naming both values; the runtime keys
    (:data:`RUNTIME_MODEL_KEYS`) keep the composed values. The preprocessing (``dataset.image_size``,
    ``dataset.resize``) is the checkpoint's unless set on the command line. Original-format files
    carry no description: the composed config is used as it is.
    """
    description = checkpoint.description
    if not description:
        if checkpoint.kind == "lightning":
            log.warning("%s holds no run description (an older checkpoint): the model is built from the "
                        "composed config", checkpoint.path)
        return
    stored = _flatten(description["model"])
    composed = _flatten(OmegaConf.to_container(cfg.model, resolve=True))
    keys = override_keys(overrides)
    model_overrides = [k[len("model."):] if k != "model" else "" for k in keys if k == "model" or k.startswith("model.")]

    def explicit(key: str) -> bool:
        return any(o == "" or key == o or key.startswith(o + ".") for o in model_overrides)

    runtime = lambda key: any(key == r or key.startswith(r + ".") for r in RUNTIME_MODEL_KEYS)  # noqa: E731
    conflicts = [
        f"model.{key}={composed.get(key, '<absent>')} but the checkpoint was trained with "
        f"model.{key}={stored.get(key, '<absent>')}"
        for key in sorted(set(stored) | set(composed))
        if not runtime(key) and explicit(key) and composed.get(key) != stored.get(key)
    ]
    if conflicts:
        raise ConfigError(f"the command line contradicts the architecture stored in {checkpoint.path}:\n  "
                          + "\n  ".join(conflicts) + "\nRemove these overrides: the checkpoint's architecture is used.")
    model = OmegaConf.create(description["model"])
    for key in RUNTIME_MODEL_KEYS:
        value = OmegaConf.select(cfg.model, key)
        if value is not None:
            OmegaConf.update(model, key, value, force_add=True)
    model.backbone.weights = WEIGHTS_DEFERRED  # the checkpoint holds the encoder
    preprocessing = description.get("preprocessing", {})
    with open_dict(cfg):
        cfg.model = model
        for key in PREPROCESSING_KEYS:
            if key not in preprocessing:
                continue
            if f"dataset.{key}" in keys and cfg.dataset.get(key) != preprocessing[key]:
                log.warning("dataset.%s=%s on the command line; the checkpoint was trained with %s",
                            key, cfg.dataset.get(key), preprocessing[key])
            else:
                cfg.dataset[key] = preprocessing[key]
    log.info("Model and preprocessing from %s (trained at commit %s)", checkpoint.path,
             (description.get("git") or {}).get("commit"))


# --------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder, then renames it into place.

    A rename within one folder is atomic, so a crash at any moment leaves either the previous
    file or the complete new one (Lightning's default stages the file in ``TMPDIR``, which on
    another filesystem becomes a copy that a crash can cut short). Remote paths use Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as err:
            if not _disk_full(err):
                raise
            tmp.unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"cannot write {path}: no space left on the disk of {path.parent} ({free / 2**20:.1f} MiB free). "
                "Nothing was lost: the checkpoints written before are complete. Free space there and resume with "
                "ckpt_path=last (or move the run folder to a disk with room and resume it there)") from err
        finally:
            tmp.unlink(missing_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer (one live run per folder)
            stale.unlink(missing_ok=True)


def _disk_full(err: BaseException | None) -> bool:
    """Whether a full disk (or quota) is behind ``err``: torch's writer reports it as a
    RuntimeError ("unexpected pos") raised while handling the OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


# --------------------------------------------------------------------------- resuming
def resume_candidates(output_dir: str | Path) -> list[Path]:
    """Checkpoints a run in ``output_dir`` left, newest first (the order among equal steps,
    :func:`find_resume_checkpoint`): ``checkpoints/{last,interrupted,step_*}.ckpt`` and
    Lightning's SLURM requeue checkpoints ``hpc_ckpt_<n>.ckpt``."""
    output_dir = Path(output_dir)
    folder = output_dir / "checkpoints"
    found = [folder / "last.ckpt", folder / INTERRUPTED, *folder.glob("step_*.ckpt"), *output_dir.glob("hpc_ckpt_*.ckpt")]
    found = [p for p in found if p.is_file()]
    rank = {"last.ckpt": 3, INTERRUPTED: 2}  # files written within one clock tick: the later kind first
    return sorted(found, key=lambda p: (p.stat().st_mtime, rank.get(p.name, 1 if p.name.startswith("hpc") else 0),
                                        p.name), reverse=True)


def find_resume_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The checkpoint of ``output_dir`` that loads and is furthest on (highest ``global_step``;
    the newest among equal steps); each one skipped is named in a warning.

    The step decides, not the modification time: a copy (``cp -r`` without ``-p``) or a restore
    from a backup gives every file a new time in any order. Reading a candidate is cheap (its
    tensors are memory-mapped, not read).
    """
    loaded = []
    for path in resume_candidates(output_dir):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as err:
            log.warning("ckpt_path=last: skipping %s: %s", path, err)
            continue
        if checkpoint.kind == "lightning":
            loaded.append(checkpoint)
        else:
            log.warning("ckpt_path=last: skipping %s: not a training checkpoint of this project", path)
    return max(loaded, key=lambda c: c.global_step or 0, default=None)  # the first (newest) of equal steps
