"""The data module of every run: one or more dataset sources as one.

Every ``conf/dataset/<name>.yaml`` puts its own settings under ``sources.<name>`` (source kind,
root, classes, download folder, ...) and the loader settings (sizes, batch sizes, workers,
jitter, ...) at the top level, so ``dataset=[mvtec_ad,visa]`` merges into one config. With a
single source, the top-level ``root``, ``classes``, ``source`` and ``component_masks`` (and any
other source key given at the top level) apply to it, as with one dataset.

Sources (:mod:`data_modules.sources`) only list samples; this module checks them
(:mod:`data_modules.validate`), splits them (test, validation, calibration) and builds the
datasets and loaders (:mod:`data_modules.dataset`). Training samples are drawn uniformly over
all images, like the original (``balance=image``), or with equal total weight per dataset
(``balance=dataset``). Test and validation sets hold every class of every source; batches carry
``dataset`` and ``class_name``, so reports are per class and per dataset.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from data_modules.dataset import (
    AnomalyDataset,
    AnomalyTransforms,
    BalancedSampler,
    evenly_spaced,
    make_loader,
    split_validation,
)
from data_modules.io import pixel_limit
from data_modules.sources import Source, build_source, source_class
from data_modules.types import DataError, Sample
from data_modules.validate import raise_problems, validate_samples

log = logging.getLogger(__name__)

INHERIT = "default"  # top-level component_masks: each source's own setting


class AnomalyDataModule(LightningDataModule):
    """One or more dataset sources as one data module: the union of their classes, keyed
    ``<dataset>/<class>``.

    Args:
        sources: ``{name: settings}``; settings hold ``kind`` (a source kind, see
            :mod:`data_modules.sources`; default ``mvtec_ad``) and its own arguments (``root``, ``classes``,
            ``download_hint``, ``source``: the download folder for ``mode=prepare``, ...).
        name: a single source's name in reports (renames it); with several sources only a label
            of the combination (default: the names joined by ``+``).
        root / classes / source: for a single source, override its settings; with several
            sources they must stay unset (set ``sources.<name>.root`` etc.).
        component_masks: ``default`` = each source's own; ``null`` = none for every source; a
            folder (single source).
        balance: ``image`` (uniform over images, the original) or ``dataset`` (each dataset
            gets the same share of training samples).
        skip_bad: ``mode=prepare`` leaves unusable inputs out (counted) instead of stopping.
        max_image_pixels: images with more pixels are refused with an error naming the file
            (None: Pillow's default limit, 89.5 million); every dataset carries it into the
            loader workers.
        image_size: centre crop (392 in the original); ``resize``: square resize before it (448).
        batch_size / test_batch_size / num_workers: loader settings.
        jitter: colour-jitter strength for the global experts' input.
        eval_jitter: also jitter at test time, like the original (non-deterministic; SPEC B4).
        gt_resize: ``bilinear`` (original; slightly dilates masks) or ``nearest``.
        val_fraction: share of each class's test images (good and anomalous alike) held out as a
            validation set, e.g. for sweeps; they leave the test set. 0 (default, the original
            protocol): no validation set.
        validation_split: validate on the dataset's own validation split
            (``<class>/validation``, e.g. MVTec LOCO, MVTec 3D-AD, BMAD) when ``val_fraction`` is 0;
            classes without one contribute nothing.
        Other keyword arguments are source settings of the single source.
    """

    def __init__(
        self,
        sources: Mapping[str, Mapping],
        name: str | None = None,
        root: str | None = None,
        classes: Sequence[str] | None = None,
        source: str | None = None,
        component_masks: str | None = INHERIT,
        balance: str = "image",
        skip_bad: bool = False,
        max_image_pixels: int | None = None,
        image_size: int | None = 392,
        resize: int = 448,
        batch_size: int = 8,
        test_batch_size: int = 16,
        num_workers: int = 4,
        jitter: float = 0.2,
        eval_jitter: bool = False,
        gt_resize: str = "bilinear",
        val_fraction: float = 0.0,
        validation_split: bool = False,
        **source_overrides,
    ) -> None:
        super().__init__()
        if not sources:
            raise DataError("dataset.sources is empty: choose dataset=<name> or dataset=[<name>,<name>]")
        if len(sources) == 1 and name and name not in sources:
            sources = {name: next(iter(sources.values()))}
        if balance not in ("image", "dataset"):
            raise ValueError(f"dataset.balance={balance!r}: use image (uniform over images) or dataset")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction={val_fraction}: use a share in [0, 1), e.g. 0.3")
        overrides = {"root": root, "classes": classes, "source": source, **source_overrides}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if component_masks != INHERIT and component_masks is not None:
            overrides["component_masks"] = component_masks
        if len(sources) > 1 and overrides:
            key = next(iter(overrides))
            raise DataError(
                f"dataset.{key} is ambiguous with several datasets ({', '.join(sources)}): set "
                + ", ".join(f"dataset.sources.{name}.{key}" for name in sources) + " instead"
            )
        self.label = name if name and len(sources) > 1 and name not in sources else "+".join(sources)
        self.sources: dict[str, Source] = {}
        self.download_dirs: dict[str, str | None] = {}
        for key, settings in sources.items():
            settings = {**dict(settings), **overrides}
            if component_masks is None:  # null: no component masks for any dataset
                settings["component_masks"] = None
            kind = settings.pop("kind", "mvtec_ad")
            reads_source = source_class(kind).reads_source
            self.download_dirs[key] = settings.get("source") if reads_source else settings.pop("source", None)
            self.sources[key] = build_source(kind, name=key, **settings)
        self.transforms = AnomalyTransforms(resize, image_size, jitter, gt_resize)
        self.max_pixels = pixel_limit(max_image_pixels)
        self.balance, self.skip_bad = balance, skip_bad
        self.batch_size, self.test_batch_size, self.num_workers = batch_size, test_batch_size, num_workers
        self.eval_jitter = eval_jitter
        self.val_fraction, self.validation_split = val_fraction, validation_split
        self._checked = False
        self.train_set: AnomalyDataset | None = None
        self.val_set: AnomalyDataset | None = None
        self.test_set: AnomalyDataset | None = None

    # ------------------------------------------------------------------ names, folders, classes
    @property
    def name(self) -> str:
        return self.label

    @property
    def roots(self) -> dict[str, Path]:
        """Each dataset's folder."""
        return {name: s.root for name, s in self.sources.items()}

    @property
    def component_root(self) -> Path | dict[str, Path | None] | None:
        roots = {name: s.component_root for name, s in self.sources.items()}
        if not any(roots.values()):
            return None
        return next(iter(roots.values())) if len(roots) == 1 else roots

    def component_class_folders(self) -> dict[str, Path] | None:
        """Each class key's folder of component masks (``<component_masks>/<class>``), or None when
        a dataset has none."""
        folders = {}
        for name, source in self.sources.items():
            if source.component_root is None:
                return None
            folders.update({f"{name}/{c}": source.component_root / c for c in source.class_names()})
        return folders

    def class_names(self) -> list[str]:
        """The class keys ``<dataset>/<class>``, the names used in reports (same as
        :attr:`test_class_keys`); a missing dataset or class is an error here."""
        return self.test_class_keys

    def list_samples(self, class_key: str, split: str) -> list[Sample]:
        """Samples of a class (a key of :meth:`class_names`) and split."""
        dataset, _, name = class_key.partition("/")
        if not name or dataset not in self.sources:
            raise DataError(f"class key {class_key!r}: expected <dataset>/<class> with a dataset of {list(self.sources)}")
        return self.sources[dataset].list_samples(name, split)

    @property
    def test_class_keys(self) -> list[str]:
        keys = [key for s in self.sources.values() for key in s.class_keys]
        duplicates = [k for k, n in Counter(keys).items() if n > 1]
        if duplicates:
            raise DataError(f"class keys {duplicates} appear twice: give each dataset source its own name")
        return keys

    def require_component_masks(self, num_component_experts: int) -> None:
        """Training with component experts needs each dataset's component masks (``mode=segment``).

        Without them the component experts would get no gradient and stay at their initial
        weights (the original's released training loader never found its masks, SPEC 10 B2), so
        a missing folder is an error naming the fixes. A family whose images may have no parts
        (``components_optional``, a user's own folder) is trained without: its images are routed
        to patch and global experts only, which is logged.
        """
        if not num_component_experts:
            return
        for name, source in self.sources.items():
            key = "dataset.component_masks" if len(self.sources) == 1 else f"dataset.sources.{name}.component_masks"
            folder = source.component_root  # where training reads them
            if source.components_optional:
                if folder is None:
                    log.warning("%s: no component masks%s: its images are routed to patch and global experts only "
                                "(compute masks with `python run.py mode=segment dataset=%s` to use the component "
                                "experts)", name, f" in {source.component_folder}" if source.component_folder else "", name)
                continue
            fixes = (f"compute them with `python run.py mode=segment dataset={name}`, point {key} at a folder of "
                     "masks, or train without component experts with model.num_component_experts=0")
            if folder is None:
                raise DataError(f"model.num_component_experts={num_component_experts} but {key} is null: {fixes}")
            if not folder.is_dir():
                raise DataError(f"component masks folder {key}={folder} does not exist: {fixes}")

    # ------------------------------------------------------------------ splits
    def split_samples(self, sources: Mapping[str, Source] | None = None) -> tuple[list[Sample], list[Sample]]:
        """(validation, test) samples of ``sources`` (default: all): ``val_fraction`` of each
        class's test images, else each dataset's own validation split when ``validation_split``
        is set, else no validation set."""
        val, test = [], []
        for source in (self.sources if sources is None else sources).values():
            samples = source.samples("test")
            if self.val_fraction > 0:
                v, samples = split_validation(samples, self.val_fraction)
            else:
                v = source.samples("validation") if self.validation_split else []
            val, test = val + v, test + samples
        return val, test

    def check_samples(self, stage: str | None, sources: Mapping[str, Source] | None = None) -> None:
        """Check every image and mask the stage reads (``fit``: training, validation and test
        splits of every source, so nothing is found after training) once; all problems of all
        sources in one error (:mod:`data_modules.validate`). ``sources``: only these (checked
        every time)."""
        if sources is None and self._checked:
            return
        chosen = self.sources if sources is None else sources
        val, test = self.split_samples(chosen)
        train = [s for source in chosen.values() for s in source.samples("train")] if stage in (None, "fit") else []
        samples = train + val + test
        start = time.perf_counter()
        problems = validate_samples(samples, {name: s.component_root for name, s in chosen.items()}, self.max_pixels)
        log.info("%s: checked %d images and their masks in %.1f s", self.name, len(samples), time.perf_counter() - start)
        raise_problems(problems, f"dataset '{self.name}'", {name: s.root for name, s in chosen.items()})
        self._checked = sources is None and stage in (None, "fit")

    # ------------------------------------------------------------------ datasets
    def prepare_data(self) -> None:
        for source in self.sources.values():
            source.prepare_data()

    def _dataset(self, samples: list[Sample], jitter_ae: bool) -> AnomalyDataset:
        return AnomalyDataset(samples, self.transforms, self.test_class_keys, jitter_ae, self.component_root,
                              self.max_pixels)

    def setup(self, stage: str | None = None) -> None:
        self.check_samples(stage)
        if stage in (None, "fit") and self.train_set is None:
            samples = [s for source in self.sources.values() for s in source.samples("train")]
            self.train_set = self._dataset(samples, True)
            counts = Counter(s.dataset for s in samples)
            log.info("%s: %d training images in %d classes (%s)", self.name, len(samples), len(self.test_class_keys),
                     ", ".join(f"{k} {n}" for k, n in counts.items()))
        wants_val = self.val_fraction > 0 or self.validation_split
        if self.test_set is None and (stage in (None, "test", "predict") or wants_val):
            val, test = self.split_samples()
            self.test_set = self._dataset(test, self.eval_jitter)
            if val:
                self.val_set = self._dataset(val, self.eval_jitter)
            log.info("%s: %d test images, %d for validation", self.name, len(test), len(val))

    # ------------------------------------------------------------------ loaders
    def train_sampler(self) -> Sampler | None:
        """None (uniform shuffling) or, with ``balance=dataset``, a sampler giving each dataset
        the same share of the epoch's samples."""
        if self.balance == "image" or self.train_set is None:
            return None
        datasets = [s.dataset for s in self.train_set.samples]
        sizes = Counter(datasets)
        weights = np.array([1.0 / sizes[d] for d in datasets])
        return BalancedSampler(weights / weights.sum(), len(datasets))

    def _loader(self, dataset: AnomalyDataset, batch_size: int, train: bool) -> DataLoader:
        # Every training sampler keeps its state in the stateful training loader.
        return make_loader(dataset, batch_size, train, self.num_workers, self.train_sampler() if train else None)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise DataError(
                f"dataset '{self.name}' has no validation set: set dataset.val_fraction (e.g. 0.3) to hold out "
                "part of each class's test images, dataset.validation_split=true to use a dataset's own "
                "validation split, or trainer.limit_val_batches=0"
            )
        return self._loader(self.val_set, self.test_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None, "call setup('test') first"
        return self._loader(self.test_set, self.test_batch_size, train=False)

    def normal_dataloader(self, images_per_class: int | None = None) -> DataLoader:
        """Normal training images of every class with the test-time pipeline (calibration: the
        inductive protocol's statistics, decision thresholds); up to ``images_per_class`` per
        class, evenly spaced over the sorted list (``None``: all)."""
        samples = []
        for source in self.sources.values():
            for class_name in source.class_names():
                samples += evenly_spaced(source.list_samples(class_name, "train"), images_per_class)
        log.info("%s: %d normal training images for calibration", self.name, len(samples))
        return self._loader(self._dataset(samples, self.eval_jitter), self.test_batch_size, train=False)
