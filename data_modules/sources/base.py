"""A dataset source: where one dataset's images are and which samples it holds.

A :class:`Source` lists classes and samples in the MVTec AD layout (:mod:`data_modules.types`);
a source kind that reads another layout overrides :meth:`Source.class_names` and
:meth:`Source.list_samples`. Sources hold no loader settings: the data module
(:class:`data_modules.datamodule.AnomalyDataModule`) builds splits, datasets and loaders from
the samples of all its sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from data_modules.io import list_images
from data_modules.types import IMAGE_EXTENSIONS, DataError, Sample


def list_mvtec_samples(root: Path, dataset: str, class_name: str, split: str) -> list[Sample]:
    """Samples of one class in the MVTec AD layout (a defect image's mask path is where its mask
    belongs; :func:`data_modules.validate.validate_samples` reports it when absent).

    ``split``: ``train`` (``train/good``), ``test`` (``test/<type>``, masks in ``ground_truth``)
    or ``validation`` (``validation/<type>``, masks in ``ground_truth_validation``).
    """
    class_dir = root / class_name
    if split == "train":
        folder = class_dir / "train" / "good"
        if not folder.is_dir():
            raise DataError(f"{folder} not found: expected training images in <root>/<class>/train/good")
        images = list_images(folder)
        if not images:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return [Sample(p, 0, "train", "good", dataset, class_name) for p in images]
    if split not in ("test", "validation"):
        raise ValueError(f"split={split!r}: use train, test or validation")
    split_dir = class_dir / split
    gt_dir = class_dir / ("ground_truth" if split == "test" else "ground_truth_validation")
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} not found: expected {split} images in <root>/<class>/{split}/<type>")
    samples = []
    for type_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        defect = type_dir.name
        for image in list_images(type_dir):
            if defect == "good":
                samples.append(Sample(image, 0, split, defect, dataset, class_name))
                continue
            # A missing mask is reported with every other problem by data_modules.validate.
            samples.append(Sample(image, 1, split, defect, dataset, class_name, gt_dir / defect / f"{image.stem}_mask.png"))
    if not samples:
        raise DataError(f"{split_dir} holds no {split} images")
    return samples



class Source:
    """One dataset in the MVTec AD layout under ``root``.

    Args:
        root: the dataset folder.
        name: dataset name used in reports (``<name>/<class>``).
        classes: classes to use; ``None`` = every class folder under ``root``.
        component_masks: folder of cached component masks (``mode=segment``) or None.
        download_hint: how to get the data, shown when ``root`` is missing.

    Attributes a kind may set: ``reads_source`` (it reads ``dataset.source`` in place: no
    ``mode=prepare``), ``components_optional`` (its images may have no parts: it trains without
    component masks when it has none), ``component_folder`` (where ``mode=segment`` writes its
    masks; by default where training reads them, ``component_root``).
    """

    reads_source = False
    components_optional = False

    def __init__(self, root: str, name: str, classes: Sequence[str] | None = None,
                 component_masks: str | None = None, download_hint: str = "") -> None:
        self.root = Path(root).expanduser()
        self.name = name
        self.classes = list(classes) if classes else None
        self.component_root = Path(component_masks).expanduser() if component_masks else None
        self.component_folder = self.component_root
        self.download_hint = download_hint

    def prepare_data(self) -> None:
        """Make the data available (generated data); nothing for data on disk."""

    def class_names(self) -> list[str]:
        if not self.root.is_dir():
            raise DataError(f"dataset '{self.name}' not found at {self.root}. {self.download_hint}".strip())
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and (d / "train").is_dir())
        if self.classes is None:
            if not found:
                raise DataError(f"no class folders with a train/ subfolder under {self.root}")
            return found
        unknown = [c for c in self.classes if c not in found]
        if unknown:
            raise DataError(f"unknown class(es) {unknown} for dataset '{self.name}' under {self.root}; available: {found}")
        return list(self.classes)

    def list_samples(self, class_name: str, split: str) -> list[Sample]:
        return list_mvtec_samples(self.root, self.name, class_name, split)

    def samples(self, split: str) -> list[Sample]:
        """Every class's samples of ``split``; ``validation`` lists the classes that have one."""
        if split == "validation":
            names = [c for c in self.class_names() if (self.root / c / "validation").is_dir()]
        else:
            names = self.class_names()
        return [s for c in names for s in self.list_samples(c, split)]

    @property
    def class_keys(self) -> list[str]:
        return [f"{self.name}/{c}" for c in self.class_names()]
