"""The segmentation cache: one packbits ``.npz`` per image (:mod:`data_modules.components`),
a per-class ``manifest.json`` and the fitted ``prototypes.npz``.

``manifest.json`` records the route, every parameter that shapes the masks (features, backbone
weights fingerprint, k, refinement, background rule), the sha1 of the training images the
prototypes were fitted on, the kept part slots, and per image its content sha1 and mask file.
A re-run recomputes a whole class when any of these parameters or training images changed,
and otherwise only the images whose content changed or whose mask file is missing or
unreadable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from data_modules.components import read_component_masks

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROTOTYPES = "prototypes.npz"
CACHE_FORMAT = 1


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def params_key(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()


def read_manifest(class_dir: Path) -> dict | None:
    """The class's manifest, or None (absent, unreadable or of another format: recompute)."""
    path = class_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("Cache manifest %s is unreadable (%s): recomputing the class", path, err)
        return None
    if manifest.get("format") != CACHE_FORMAT:
        log.warning("Cache manifest %s has format %s, expected %s: recomputing the class",
                    path, manifest.get("format"), CACHE_FORMAT)
        return None
    return manifest


def write_manifest(class_dir: Path, manifest: dict) -> None:
    """Atomic: a crash leaves the previous manifest, never a half-written one."""
    class_dir.mkdir(parents=True, exist_ok=True)
    tmp = class_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, **manifest}, indent=1, sort_keys=True))
    os.replace(tmp, class_dir / MANIFEST)


def entry_is_current(class_dir: Path, entry: dict | None, sha1: str) -> bool:
    """An image's cache entry is current when its sha1 matches and its mask file reads back
    with the recorded number of masks."""
    if entry is None or entry.get("sha1") != sha1:
        return False
    path = class_dir / entry["masks"]
    if not path.is_file():
        log.warning("Cached masks %s are missing: recomputing them", path)
        return False
    try:
        masks = read_component_masks(path)
    except Exception as err:  # any corruption of the file
        log.warning("Cached masks %s are unreadable (%s: %s): recomputing them", path, type(err).__name__, err)
        return False
    if masks.shape[0] != entry.get("count"):
        log.warning("Cached masks %s hold %d masks, the manifest says %s: recomputing them",
                    path, masks.shape[0], entry.get("count"))
        return False
    return True


def save_prototypes(class_dir: Path, arrays: dict) -> None:
    class_dir.mkdir(parents=True, exist_ok=True)
    tmp = class_dir / f".{PROTOTYPES}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, class_dir / PROTOTYPES)


def load_prototypes(class_dir: Path) -> dict | None:
    path = class_dir / PROTOTYPES
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:
        log.warning("Cached prototypes %s are unreadable (%s): refitting the class", path, err)
        return None
