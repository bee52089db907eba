"""One model on several datasets: a datamodule holding one family datamodule per source.

Every ``conf/dataset/<name>.yaml`` puts its own settings under ``sources.<name>`` (family class,
root, classes, download folder, ...) and the loader settings (sizes, batch sizes, workers,
jitter, ...) at the top level, so ``dataset=[mvtec_ad,visa]`` merges into one config. With a
single source, the top-level ``root``, ``classes``, ``source`` and ``component_masks`` (and any
other source key given at the top level) apply to it, as with one dataset.

Training samples are drawn uniformly over all images, like the original (``balance=image``),
or with equal total weight per dataset (``balance=dataset``). Test and validation sets hold
every class of every source; batches carry ``dataset`` and ``class_name``, so reports are
per class and per dataset.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from data_modules.base import (
    AnomalyDataset,
    DataError,
    LoaderDataModule,
    Sample,
    SourceDataModule,
    evenly_spaced,
    set_max_image_pixels,
)
from data_modules.sources import build_source, source_class

log = logging.getLogger(__name__)

INHERIT = "default"  # top-level component_masks: each source's own setting


class BalancedSampler(Sampler[int]):
    """Indices drawn with replacement with probability ``weights``, ``num_samples`` per epoch.

    The order is a function of ``(seed, epoch)`` alone: Lightning sets the epoch
    (:meth:`set_epoch`; without it each pass moves to the next epoch), so every process of a DDP
    run draws the same order, and a resumed run draws the same indices again. The iterator's
    state (seed, epoch, indices given) is saved by the StatefulDataLoader for a mid-epoch resume.
    """

    def __init__(self, weights: Sequence[float], num_samples: int, seed: int | None = None) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = num_samples
        # Like torch's samplers, the seed comes from the global RNG (seeded by ``seed=``).
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.multinomial(self.weights, self.num_samples, True, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        iterator = _BalancedIterator(self, self.epoch)
        self.epoch += 1
        return iterator


class _BalancedIterator(Iterator[int]):
    def __init__(self, sampler: BalancedSampler, epoch: int) -> None:
        self.sampler, self.epoch, self.yielded = sampler, epoch, 0
        self.indices = sampler.order(epoch)

    def __next__(self) -> int:
        if self.yielded >= len(self.indices):
            raise StopIteration
        self.yielded += 1
        return self.indices[self.yielded - 1]

    def state_dict(self) -> dict:
        return {"seed": self.sampler.seed, "epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.seed, self.epoch, self.yielded = state["seed"], state["epoch"], state["yielded"]
        self.indices = self.sampler.order(self.epoch)
        self.sampler.epoch = self.epoch + 1


class AnomalyDataModule(LoaderDataModule):
    """The data module of every run: one or more dataset sources as one, the union of their
    classes, keyed ``<dataset>/<class>``.

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
            (None: Pillow's limit, 89.5 million).
        The remaining arguments are the loader settings of :class:`SourceDataModule`, shared by
        every source; other keyword arguments are source settings of the single source.
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
        set_max_image_pixels(max_image_pixels)
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
        shared = dict(image_size=image_size, resize=resize, batch_size=batch_size, test_batch_size=test_batch_size,
                      num_workers=num_workers, jitter=jitter, eval_jitter=eval_jitter, gt_resize=gt_resize,
                      val_fraction=val_fraction, validation_split=validation_split)
        self.label = name if name and len(sources) > 1 and name not in sources else "+".join(sources)
        self.modules: dict[str, SourceDataModule] = {}
        self.download_dirs: dict[str, str | None] = {}
        for key, settings in sources.items():
            settings = {**dict(settings), **overrides}
            if component_masks is None:  # null: no component masks for any dataset
                settings["component_masks"] = None
            kind = settings.pop("kind", "mvtec_ad")
            reads_source = source_class(kind).reads_source
            self.download_dirs[key] = settings.get("source") if reads_source else settings.pop("source", None)
            self.modules[key] = build_source(kind, name=key, **settings, **shared)
        self.balance, self.skip_bad = balance, skip_bad
        self.batch_size, self.test_batch_size, self.num_workers = batch_size, test_batch_size, num_workers
        self.eval_jitter = eval_jitter
        first = next(iter(self.modules.values()))
        self.transforms = first.transforms
        self.val_fraction = val_fraction
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
        return {name: m.root for name, m in self.modules.items()}

    @property
    def component_root(self) -> Path | dict[str, Path | None] | None:
        roots = {name: m.component_root for name, m in self.modules.items()}
        if not any(roots.values()):
            return None
        return next(iter(roots.values())) if len(roots) == 1 else roots

    def component_class_folders(self) -> dict[str, Path] | None:
        """Each class key's folder of component masks (``<component_masks>/<class>``), or None when
        a dataset has none."""
        folders = {}
        for name, module in self.modules.items():
            if module.component_root is None:
                return None
            folders.update({f"{name}/{c}": module.component_root / c for c in module.class_names()})
        return folders

    def class_names(self) -> list[str]:
        """The class keys ``<dataset>/<class>``, the names used in reports (same as
        :attr:`test_class_keys`); a missing dataset or class is an error here."""
        return self.test_class_keys

    def list_samples(self, class_key: str, split: str) -> list[Sample]:
        """Samples of a class (a key of :meth:`class_names`) and split."""
        dataset, _, name = class_key.partition("/")
        if not name or dataset not in self.modules:
            raise DataError(f"class key {class_key!r}: expected <dataset>/<class> with a dataset of {list(self.modules)}")
        return self.modules[dataset].list_samples(name, split)

    @property
    def test_class_keys(self) -> list[str]:
        keys = [key for m in self.modules.values() for key in m.test_class_keys]
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
        for name, module in self.modules.items():
            key = "dataset.component_masks" if len(self.modules) == 1 else f"dataset.sources.{name}.component_masks"
            folder = module.component_root  # where training reads them
            if getattr(module, "components_optional", False):
                if folder is None:
                    log.warning("%s: no component masks%s: its images are routed to patch and global experts only "
                                "(compute masks with `python run.py mode=segment dataset=%s` to use the component "
                                "experts)", name, f" in {module.component_folder}" if module.component_folder else "", name)
                continue
            fixes = (f"compute them with `python run.py mode=segment dataset={name}`, point {key} at a folder of "
                     "masks, or train without component experts with model.num_component_experts=0")
            if folder is None:
                raise DataError(f"model.num_component_experts={num_component_experts} but {key} is null: {fixes}")
            if not folder.is_dir():
                raise DataError(f"component masks folder {key}={folder} does not exist: {fixes}")

    # ------------------------------------------------------------------ datasets
    def prepare_data(self) -> None:
        for module in self.modules.values():
            module.prepare_data()

    def _dataset(self, samples: list[Sample], jitter_ae: bool) -> AnomalyDataset:
        return AnomalyDataset(samples, self.transforms, self.test_class_keys, jitter_ae, self.component_root)

    def sources(self) -> dict[str, SourceDataModule]:
        return self.modules

    def setup(self, stage: str | None = None) -> None:
        self.check_samples(stage)
        if stage in (None, "fit") and self.train_set is None:
            samples = [s for m in self.modules.values() for s in m.samples("train")]
            self.train_set = self._dataset(samples, True)
            counts = Counter(s.dataset for s in samples)
            log.info("%s: %d training images in %d classes (%s)", self.name, len(samples), len(self.test_class_keys),
                     ", ".join(f"{k} {n}" for k, n in counts.items()))
        wants_val = self.val_fraction > 0 or any(m.validation_split for m in self.modules.values())
        if self.test_set is None and (stage in (None, "test", "predict") or wants_val):
            val, test = [], []
            for module in self.modules.values():
                v, t = module.split_samples()
                val, test = val + v, test + t
            self.test_set = self._dataset(test, self.eval_jitter)
            if val:
                self.val_set = self._dataset(val, self.eval_jitter)
            log.info("%s: %d test images, %d for validation", self.name, len(test), len(val))

    def train_sampler(self) -> Sampler | None:
        """None (uniform shuffling) or, with ``balance=dataset``, a sampler giving each dataset
        the same share of the epoch's samples."""
        if self.balance == "image" or self.train_set is None:
            return None
        datasets = [s.dataset for s in self.train_set.samples]
        sizes = Counter(datasets)
        weights = np.array([1.0 / sizes[d] for d in datasets])
        return BalancedSampler(weights / weights.sum(), len(datasets))

    def normal_dataloader(self, images_per_class: int | None = None) -> DataLoader:
        """Normal training images of every class with the test-time pipeline (calibration); up
        to ``images_per_class`` per class, evenly spaced."""
        samples = []
        for module in self.modules.values():
            for class_name in module.class_names():
                samples += evenly_spaced(module.list_samples(class_name, "train"), images_per_class)
        log.info("%s: %d normal training images for calibration", self.name, len(samples))
        return self._loader(self._dataset(samples, self.eval_jitter), self.test_batch_size, train=False)
