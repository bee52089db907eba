"""A user's own images, read in place: ``python run.py dataset=folder dataset.source=<folder>``.

Layout (folder names configurable)::

    <source>/good/*.png                 normal images (normal_dir)
    <source>/bad/*.png                  anomalous images of one type "bad" (abnormal_dir), or
    <source>/bad/<type>/*.png           one folder per defect type (results per type)
    <source>/masks/[<type>/]<stem>.png  optional pixel masks (mask_dir), also <stem>_mask.png
    <source>/good_test/*.png            optional normal test images (normal_test_dir)

Without ``normal_test_dir`` a seeded random share of the normal images
(``normal_test_fraction``, ``split_seed``) is held out for testing. Without masks the anomalous
images count for the image metrics only (pixel metrics are null with a note). Nothing is copied
or converted, so there is nothing to keep in step with the folder: each run lists it afresh.
Component masks (``mode=segment``) go to a folder of their own per source, under
``component_masks``; a source without them is a dataset without parts (its images are routed to
patch and global experts only).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_modules.sources.base import Source
from data_modules.types import IMAGE_EXTENSIONS, DataError, Sample

log = logging.getLogger(__name__)


def _images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions
                  and not p.name.startswith("."))


def source_key(folder: Path) -> str:
    """A folder name for things computed from ``folder`` (its name and a hash of its full path)."""
    resolved = folder.expanduser().resolve()
    return f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"


def held_out(count: int, fraction: float, seed: int) -> set[int]:
    """Indices of a seeded random ``fraction`` of ``count`` items (at least one, and at least
    one left, when ``fraction > 0`` and ``count >= 2``)."""
    if fraction <= 0 or count < 2:
        return set()
    take = min(count - 1, max(1, round(fraction * count)))
    return set(np.random.default_rng(seed).permutation(count)[:take].tolist())


class FolderSource(Source):
    """A user's folder of images (module docstring).

    Args:
        source: the folder (``dataset.source``); ``root`` is taken when it is unset.
        class_name: the class the images become (``<name>/<class_name>`` in reports).
        normal_dir: normal images, relative to ``source``.
        abnormal_dir: anomalous images (used when the folder exists): images directly in it are
            one type named after it, each sub-folder is a type of its own.
        mask_dir: pixel masks of the anomalous images (used when the folder exists), mirroring
            the type folders of ``abnormal_dir`` or flat; ``<stem>.<ext>`` or ``<stem>_mask.<ext>``.
        normal_test_dir: normal test images; None: hold out ``normal_test_fraction`` of the normal
            images, drawn with ``split_seed``.
        extensions: accepted image file endings (case-insensitive).
        component_masks: the folder under which each source's component masks have their own
            sub-folder (:func:`source_key`); None: none.
    """

    reads_source = True  # the datamodule reads dataset.source itself (no mode=prepare)
    components_optional = True  # without component masks: a dataset without parts

    def __init__(self, source: str | None = None, root: str | None = None, class_name: str = "images",
                 normal_dir: str = "good", abnormal_dir: str | None = "bad", mask_dir: str | None = "masks",
                 normal_test_dir: str | None = None, normal_test_fraction: float = 0.2, split_seed: int = 0,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, component_masks: str | None = None, **kwargs) -> None:
        folder = source or root
        super().__init__(root=str(folder or "."), **kwargs)
        self.configured = folder is not None
        if not 0.0 <= normal_test_fraction < 1.0:
            raise ValueError(f"dataset.sources.{self.name}.normal_test_fraction={normal_test_fraction}: use a share "
                             "in [0, 1), e.g. 0.2")
        self.class_name, self.normal_dir, self.abnormal_dir, self.mask_dir = class_name, normal_dir, abnormal_dir, mask_dir
        self.normal_test_dir, self.normal_test_fraction, self.split_seed = normal_test_dir, normal_test_fraction, split_seed
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.component_folder = Path(component_masks).expanduser() / source_key(self.root) if component_masks else None
        # Data without parts unless mode=segment has written this source's masks.
        self.component_root = self.component_folder if self.component_folder and self.component_folder.is_dir() else None
        self._noted: set[str] = set()

    def _note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            log.warning("%s: %s", self.name, text)

    def _dir(self, name: str | None) -> Path | None:
        return self.root / name if name and (self.root / name).is_dir() else None

    def class_names(self) -> list[str]:
        if not self.configured:
            raise DataError(f"dataset '{self.name}' reads your own images: set dataset.source=<folder> (a folder with "
                            f"{self.normal_dir}/ holding the normal images; see docs/own_images.md)")
        if not self.root.is_dir():
            raise DataError(f"dataset '{self.name}': folder {self.root} not found (dataset.source): give the folder "
                            f"of your images, with the normal ones in {self.normal_dir}/ (nothing to download; see "
                            "docs/own_images.md)")
        if not (self.root / self.normal_dir).is_dir():
            raise DataError(f"{self.root / self.normal_dir} not found: put the normal images in "
                            f"<source>/{self.normal_dir} (or set dataset.sources.{self.name}.normal_dir)")
        if self.classes and list(self.classes) != [self.class_name]:
            raise DataError(f"unknown class(es) {self.classes} for dataset '{self.name}'; available: "
                            f"['{self.class_name}'] (set dataset.sources.{self.name}.class_name to rename it)")
        return [self.class_name]

    def _listed(self, folder: Path) -> list[Path]:
        images = _images(folder, self.extensions)
        if not images:
            raise DataError(f"{folder} holds no images ({', '.join(self.extensions)}); add images or set "
                            f"dataset.sources.{self.name}.extensions")
        return images

    def list_samples(self, class_name: str, split: str) -> list[Sample]:
        if class_name not in self.class_names():
            raise DataError(f"dataset '{self.name}' has one class, {self.class_name!r}, not {class_name!r}")
        if split == "validation":
            return []
        normals = self._listed(self.root / self.normal_dir)
        if self.normal_test_dir is not None:
            if not (self.root / self.normal_test_dir).is_dir():
                raise DataError(f"{self.root / self.normal_test_dir} not found: create it or set "
                                f"dataset.sources.{self.name}.normal_test_dir=null to hold out normal images")
            test_normals = self._listed(self.root / self.normal_test_dir)
            train = normals
        else:
            held = held_out(len(normals), self.normal_test_fraction, self.split_seed)
            train = [p for i, p in enumerate(normals) if i not in held]
            test_normals = [p for i, p in enumerate(normals) if i in held]
        make = lambda p, label, sp, kind, mask=None: Sample(p, label, sp, kind, self.name, class_name, mask)  # noqa: E731
        if split == "train":
            return [make(p, 0, "train", "good") for p in train]
        if split != "test":
            raise ValueError(f"split={split!r}: use train, test or validation")
        samples = [make(p, 0, "test", "good") for p in test_normals]
        abnormal = self._dir(self.abnormal_dir)
        if abnormal is None:
            self._note(f"no anomalous images ({self.root / str(self.abnormal_dir)} absent): image metrics are "
                       "undefined; put anomalous images there to measure detection")
            return samples
        masks = self._dir(self.mask_dir)
        if masks is None:
            self._note(f"no masks folder ({self.root / str(self.mask_dir)} absent): image metrics only, pixel "
                       "metrics are null")
        types = [(Path(self.abnormal_dir).name, abnormal, masks)]
        types += [(d.name, d, masks / d.name if masks and (masks / d.name).is_dir() else masks)
                  for d in sorted(abnormal.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        for kind, folder, mask_folder in types:
            for image in _images(folder, self.extensions):
                samples.append(make(image, 1, "test", kind, self._mask(image, mask_folder)))
        return samples

    def _mask(self, image: Path, folder: Path | None) -> Path | None:
        """The mask of ``image`` in ``folder``; where it belongs when absent (reported by the
        validation); None without a masks folder."""
        if folder is None:
            return None
        for stem in (f"{image.stem}_mask", image.stem):
            for ext in self.extensions:
                for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
                    if candidate.is_file():
                        return candidate
        return folder / f"{image.stem}.png"
