"""On-disk format of component (part) masks.

One compressed ``.npz`` per image at ``<root>/<class>/<split>/<type>/<stem>.npz`` holding
``masks``: the (K, H, W) boolean masks packed along the last axis with ``np.packbits`` and
``shape``: (K, H, W). Masks are stored at the image's own resolution; the data pipeline
resizes and crops them like the image.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from data_modules.types import DataError, Sample


def component_path(root: Path, class_name: str, split: str, defect_type: str, stem: str) -> Path:
    return root / class_name / split / defect_type / f"{stem}.npz"


def save_component_masks(path: Path, masks: np.ndarray) -> None:
    """Write (K, H, W) boolean masks."""
    masks = np.asarray(masks, dtype=bool)
    assert masks.ndim == 3, f"expected (K, H, W) masks, got shape {masks.shape}"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, masks=np.packbits(masks, axis=-1), shape=np.array(masks.shape))


def read_component_masks(path: Path) -> np.ndarray:
    """(K, H, W) boolean masks from a file written by :func:`save_component_masks`."""
    try:
        with np.load(path) as data:
            shape = tuple(int(s) for s in data["shape"])
            return np.unpackbits(data["masks"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"component mask file {path} is unreadable ({type(err).__name__}: {err}): delete it and "
                        "compute it again with `python run.py mode=segment dataset=<name>` (a re-run recomputes "
                        "missing files)") from err


def load_component_masks(root: Path, sample: Sample, image_size: tuple[int, int]) -> np.ndarray:
    """Masks of ``sample``, checked against its (H, W) ``image_size``."""
    path = component_path(root, sample.class_name, sample.split, sample.defect_type, sample.image_path.stem)
    if not path.is_file():
        raise DataError(
            f"component masks for {sample.image_path} not found: expected {path}. Compute them with "
            f"`python run.py mode=segment dataset=<name>`, or set dataset.component_masks=null to train "
            "without component masks."
        )
    masks = read_component_masks(path)
    if masks.shape[1:] != tuple(image_size):
        raise DataError(f"component masks {path} are {masks.shape[1:]} but image {sample.image_path} is {tuple(image_size)}")
    return masks
