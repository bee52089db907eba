"""Shared pieces of every data module: samples, transforms, the dataset and the datamodule base.

Every dataset family is normalised to the MVTec AD layout::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/<type>/*.png              (<type> = good or a defect type)
    <root>/<class>/ground_truth/<type>/<stem>_mask.png
    <root>/<class>/validation/<type>/*.png        (optional: a dataset's own validation split)
    <root>/<class>/ground_truth_validation/<type>/<stem>_mask.png

A family only has to list its samples (:meth:`SourceDataModule.list_samples`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from lightning import LightningDataModule
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.components import load_component_masks

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity; cgroup-limited containers report theirs)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DataError(RuntimeError):
    """A dataset on disk is missing, incomplete or malformed; the message names the fix."""


@dataclass(frozen=True)
class Sample:
    image_path: Path
    label: int  # 0 normal, 1 anomalous
    split: str  # "train", "test" or "validation"
    defect_type: str  # "good" or the defect folder name
    dataset: str
    class_name: str
    mask_path: Path | None = None  # ground truth of an anomalous test image (None: image label only)

    @property
    def class_key(self) -> str:
        return f"{self.dataset}/{self.class_name}"


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


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


# Pixels above which an image is refused (``dataset.max_image_pixels``; Pillow's own default).
MAX_IMAGE_PIXELS = 89_478_485
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def set_max_image_pixels(limit: int | None) -> None:
    """Refuse images above ``limit`` pixels (None: Pillow's default) with a :class:`DataError`."""
    global MAX_IMAGE_PIXELS
    MAX_IMAGE_PIXELS = int(limit) if limit else 89_478_485
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow warns above it and stops at twice it


def header_problem(img: Image.Image) -> tuple[str, str] | None:
    """(what is wrong, the fix) when an image's size or pixel format is one the loader refuses."""
    if img.width * img.height > MAX_IMAGE_PIXELS:
        return (f"is {img.width}x{img.height} ({img.width * img.height / 1e6:.1f} MP), above "
                f"dataset.max_image_pixels={MAX_IMAGE_PIXELS}",
                "downscale it, or raise the limit (dataset.max_image_pixels=<pixels>) if it is meant to be that large")
    if img.mode == "F":
        return ("holds 32-bit floats (mode F), whose value range is not defined",
                "save it as an 8-bit or 16-bit image (e.g. values in [0, 1] times 65535 as a 16-bit PNG)")
    return None


def check_image_header(img: Image.Image, path: Path) -> None:
    """Raise a :class:`DataError` naming ``path`` when :func:`header_problem` finds one."""
    problem = header_problem(img)
    if problem is not None:
        raise DataError(f"image {path} {problem[0]}: {problem[1]}")


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` once its EXIF orientation is applied (:func:`open_image`)."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else img.size


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Open an image as ``mode``, upright: its EXIF orientation (a camera's "rotate 90°") is
    applied, like an image viewer does, in training, test and predict alike.

    Grayscale, palette and RGBA images are converted. 16-bit images (and 32-bit integer images
    holding 16-bit values) are scaled by the fixed factor 255 / 65535, never by each image's own
    range, so that a brighter or darker image stays brighter or darker. Float images and images
    above :data:`MAX_IMAGE_PIXELS` are refused with a :class:`DataError` naming the file.
    """
    try:
        with Image.open(path) as img:
            check_image_header(img, path)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
            if img.mode in SIXTEEN_BIT_MODES and mode in ("RGB", "L"):
                array = np.asarray(img, dtype=np.int64)
                if array.min() < 0 or array.max() > 65535:
                    raise DataError(f"image {path} holds 32-bit values outside 0..65535 ({array.min()}..{array.max()}): "
                                    "save it as an 8-bit or 16-bit image")
                img = Image.fromarray(np.round(array * (255 / 65535)).astype(np.uint8))
            return img.convert(mode)
    except Image.DecompressionBombError as err:
        raise DataError(f"image {path} is too large ({err}), above dataset.max_image_pixels={MAX_IMAGE_PIXELS}: "
                        "downscale it, or raise dataset.max_image_pixels") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or remove the file.") from err


class AnomalyTransforms:
    """The original pipeline (SPEC 1.1): resize (square, antialiased), to tensor, centre crop,
    ImageNet normalisation. The global experts' copy gets one of three random colour jitters.
    """

    def __init__(
        self,
        resize: int = 448,
        crop: int | None = 392,
        jitter: float = 0.2,
        gt_resize: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if gt_resize not in ("bilinear", "nearest"):
            raise ValueError(f"dataset.gt_resize={gt_resize!r}; choose bilinear (original) or nearest")
        if crop is not None and crop > resize:
            raise ValueError(f"dataset.image_size={crop} is larger than dataset.resize={resize}")
        self.resize, self.crop = resize, crop
        tail = [T.ToTensor()] + ([T.CenterCrop(crop)] if crop else []) + [T.Normalize(mean, std)]
        self.image = T.Compose([T.Resize((resize, resize)), *tail])
        self.jitter = T.RandomChoice(
            [T.ColorJitter(brightness=jitter), T.ColorJitter(contrast=jitter), T.ColorJitter(saturation=jitter)]
        )
        interpolation = T.InterpolationMode.BILINEAR if gt_resize == "bilinear" else T.InterpolationMode.NEAREST
        self.gt = T.Compose(
            [T.Resize((resize, resize), interpolation=interpolation), *([T.CenterCrop(crop)] if crop else []), T.ToTensor()]
        )

    def image_ae(self, img: Image.Image) -> Tensor:
        return self.image(self.jitter(img))

    def display(self, img: Image.Image) -> np.ndarray:
        """The image as the model sees it, before normalisation: (H, W, 3) uint8."""
        img = T.Resize((self.resize, self.resize))(img.convert("RGB"))
        return np.asarray(T.CenterCrop(self.crop)(img) if self.crop else img)

    def masks(self, masks: np.ndarray) -> Tensor:
        """(K, H, W) bool component masks -> (K, crop, crop) uint8, nearest resizing."""
        if masks.shape[0] == 0:
            return torch.zeros(0, self.output_size, self.output_size, dtype=torch.uint8)
        tensor = torch.from_numpy(masks.astype(np.uint8))[None]
        tensor = F.interpolate(tensor, size=(self.resize, self.resize), mode="nearest-exact")[0]
        if self.crop:
            tensor = T.CenterCrop(self.crop)(tensor)
        return tensor

    @property
    def output_size(self) -> int:
        return self.crop or self.resize


class AnomalyDataset(Dataset):
    """Images of one split as dicts ready for :func:`collate_samples`.

    Args:
        samples: what to load.
        transforms: the image pipeline.
        class_keys: ``dataset/class`` names; a sample's ``class_index`` is its position here.
        jitter_ae: give the global experts a colour-jittered copy (training; original test too).
        component_root: folder of cached component masks, or None for no masks; a mapping
            ``{dataset name: folder}`` when the samples come from several datasets.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transforms: AnomalyTransforms,
        class_keys: Sequence[str],
        jitter_ae: bool,
        component_root: Path | Mapping[str, Path | None] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transforms = transforms
        self.class_index = {key: i for i, key in enumerate(class_keys)}
        self.jitter_ae = jitter_ae
        self.component_root = component_root

    def __len__(self) -> int:
        return len(self.samples)

    def display_image(self, index: int) -> np.ndarray:
        """Sample ``index`` resized and cropped like the model input, as (H, W, 3) uint8."""
        return self.transforms.display(open_image(self.samples[index].image_path))

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        img = open_image(sample.image_path)
        image = self.transforms.image(img)
        item = {
            "image": image,
            "image_ae": self.transforms.image_ae(img) if self.jitter_ae else image,
            "label": sample.label,
            "index": index,
            "class_index": self.class_index[sample.class_key],
            "image_path": str(sample.image_path),
            "dataset": sample.dataset,
            "class_name": sample.class_name,
            "defect_type": sample.defect_type,
        }
        if sample.split != "train":
            # An anomalous image without a mask (a dataset with image labels only) counts for the
            # image metrics and is left out of the pixel metrics.
            item["has_gt"] = sample.label == 0 or sample.mask_path is not None
            if sample.mask_path is None:
                item["gt_mask"] = torch.zeros(1, *image.shape[-2:])
            else:
                mask = open_image(sample.mask_path, "L")
                if mask.size != img.size:  # resizing both would hide a mask that belongs elsewhere
                    raise DataError(
                        f"mask {sample.mask_path} is {mask.width}x{mask.height} but its image {sample.image_path} is "
                        f"{img.width}x{img.height}: replace the mask, or convert the dataset with mode=prepare "
                        "(which resizes masks of the same aspect ratio)"
                    )
                item["gt_mask"] = (self.transforms.gt(mask) > 0).float()
        component_root = self.component_root
        if isinstance(component_root, Mapping):
            if not any(component_root.values()):
                return item
            component_root = component_root.get(sample.dataset)
            if component_root is None:  # a dataset without masks next to one with: no components
                item["masks"] = self.transforms.masks(np.zeros((0, img.height, img.width), bool))
                return item
        if component_root is not None:
            item["masks"] = self.transforms.masks(load_component_masks(component_root, sample, (img.height, img.width)))
        return item


def split_validation(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(validation, test): every class and label gives up ``round(fraction * n)`` evenly spaced
    samples (at least one where ``fraction > 0`` and the group has two or more)."""
    if fraction <= 0:
        return [], list(samples)
    groups: dict[tuple[str, int], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.class_key, sample.label), []).append(sample)
    held: set[Path] = set()
    for members in groups.values():
        n = len(members)
        take = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        held.update(members[int(i * n / take)].image_path for i in range(take))
    return [s for s in samples if s.image_path in held], [s for s in samples if s.image_path not in held]


def collate_samples(items: list[dict]) -> dict:
    """Default collation, except component masks: padded to the batch's largest count."""
    masks = [item.pop("masks") for item in items] if "masks" in items[0] else None
    batch = default_collate(items)
    if masks is not None:
        k = max(m.shape[0] for m in masks)
        h, w = batch["image"].shape[-2:]
        padded = torch.zeros(len(masks), k, h, w, dtype=torch.uint8)
        for i, m in enumerate(masks):
            padded[i, : m.shape[0]] = m
        batch["masks"] = padded
        batch["num_masks"] = torch.tensor([m.shape[0] for m in masks])
    return batch


# Keys of a StatefulDataLoader's state that say where the sampler stands, whatever the worker count.
_SAMPLER_POSITION = ("_sampler_iter_state", "_index_sampler_state", "_sampler_iter_yielded",
                     "_IterableDataset_len_called", "_shared_seed")


def loader_state_for_workers(state: dict, num_workers: int) -> dict:
    """A ``StatefulDataLoader`` state written with any number of workers, in the form a loader
    with ``num_workers`` reads (torchdata keeps one form for 0 workers and another for more).

    The position is the sampler's state (the epoch's generator and the samples drawn) and the
    batches served; both forms hold it, so the resumed epoch continues with the same images in
    the same order. Worker states are dropped: a map-style dataset has none (the workers'
    colour-jitter streams restart, as after any resume). Only a state without a snapshot of
    its last batch (``snapshot_every_n_steps`` > 1) cannot be translated: its epoch restarts.
    """
    if not state:
        return state
    multi = "_snapshot" in state
    if multi:
        snapshot = state["_snapshot"]
        main, position = snapshot["_main_snapshot"], snapshot["_snapshot_step"]
        if main.get("_num_workers") == num_workers:
            return state
    else:
        main, position = state, state["_num_yielded"]
        if num_workers == 0:
            return state
    if multi and state.get("_steps_since_snapshot"):
        log.warning("The training loader's position was saved %d batches after its last snapshot; with another "
                    "number of loader workers it cannot be restored, so the resumed epoch starts afresh (the data "
                    "order differs from an uninterrupted run)", state["_steps_since_snapshot"])
        return {}
    log.info("Training loader state saved with %s, read with %d worker(s): position %d batches into the epoch",
             f"{main['_num_workers']} worker(s)" if multi else "0 workers", num_workers, position)
    common = {key: main[key] for key in _SAMPLER_POSITION}
    finished = state.get("_iterator_finished", False)
    if num_workers == 0:
        return {**common, "_num_yielded": position, "fetcher_state": None, "dataset_state": None,
                "_iterator_finished": finished}
    base_seed = main.get("_base_seed", int(torch.empty((), dtype=torch.int64).random_().item()))
    return {"_snapshot": {"_snapshot_step": position, "_last_yielded_worker_id": num_workers - 1,
                          "_main_snapshot": {**common, "_num_workers": num_workers, "_base_seed": base_seed},
                          "_worker_snapshots": {}},
            "_steps_since_snapshot": 0, "_iterator_finished": finished}


def _saved_by_distributed_sampler(state: dict) -> bool:
    """Whether a loader state was saved behind a ``DistributedSampler`` (a DDP run), whose
    iterator keeps no state, unlike the training samplers of one process (a seeded shuffle,
    :class:`data_modules.multi.BalancedSampler`)."""
    main = state["_snapshot"]["_main_snapshot"] if "_snapshot" in state else state
    position = main.get("_sampler_iter_state") or {}
    return "sampler_iter_state" not in position and "sampler_state" not in position


class TrainLoader(StatefulDataLoader):
    """The training loader: stateful, and resumable with another number of workers
    (:func:`loader_state_for_workers`), e.g. a requeued job on a machine with fewer CPUs.

    With another number of processes (one process after DDP, or the reverse) the images are
    shared out differently, so the epoch's position cannot be continued: the resumed epoch
    draws its images afresh, with a warning.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        state = loader_state_for_workers(state_dict, self.num_workers)
        samplers = (self.sampler, getattr(self.batch_sampler, "sampler", None))  # Lightning may put it in either
        saved_ddp = bool(state) and _saved_by_distributed_sampler(state)
        ddp = any(isinstance(sampler, DistributedSampler) for sampler in samplers)
        if state and saved_ddp != ddp:
            log.warning("The training loader's position was saved by %s and this run has %s: the resumed epoch "
                        "draws its images afresh (not the order of an uninterrupted run)",
                        "several processes" if saved_ddp else "one process", "several" if ddp else "one")
            state = {}
        super().load_state_dict(state)


def make_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, sampler=None) -> DataLoader:
    """A loader over ``dataset``: shuffled (or drawn by ``sampler``) in training, in order otherwise.

    The training loader is stateful: checkpoints store its position in the epoch (sampler state,
    batches served), so a resumed run continues with the same images in the same order, whatever
    its number of workers (:class:`TrainLoader`).
    """
    loader_class = TrainLoader if train else DataLoader
    return loader_class(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_samples,
    )


def evenly_spaced(samples: Sequence[Sample], count: int | None) -> list[Sample]:
    """Up to ``count`` samples evenly spaced over ``samples`` (``None``: all)."""
    if count is None or len(samples) <= count:
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, count).round().astype(int)]


class LoaderDataModule(LightningDataModule):
    """The loaders of a datamodule that has built ``train_set``, ``val_set`` and ``test_set`` in
    ``setup`` and has ``name``, ``batch_size``, ``test_batch_size`` and ``num_workers``."""

    train_set: AnomalyDataset | None
    val_set: AnomalyDataset | None
    test_set: AnomalyDataset | None

    def train_sampler(self) -> Sampler | None:
        """How training samples are drawn; None: a seeded shuffle."""
        return None

    def sources(self) -> dict[str, SourceDataModule]:
        """The dataset sources this data module reads, by name."""
        raise NotImplementedError

    def check_samples(self, stage: str | None) -> None:
        """Check every image and mask the stage reads (``fit``: training, validation and test
        splits of every source, so nothing is found after training) once; all problems of all
        sources in one error (:mod:`data_modules.validate`)."""
        if getattr(self, "_checked", False):
            return
        from data_modules.validate import raise_problems, validate_samples

        sources, samples = self.sources(), []
        for source in sources.values():
            val, test = source.split_samples()
            samples += (source.samples("train") if stage in (None, "fit") else []) + val + test
        start = time.perf_counter()
        problems = validate_samples(samples, {name: m.component_root for name, m in sources.items()})
        log.info("%s: checked %d images and their masks in %.1f s", self.name, len(samples), time.perf_counter() - start)
        raise_problems(problems, f"dataset '{self.name}'", {name: m.root for name, m in sources.items()})
        self._checked = stage in (None, "fit")

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
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


class SourceDataModule(LoaderDataModule):
    """One dataset source in the MVTec AD layout: a source kind (:mod:`data_modules.sources`) lists
    its samples; this class builds datasets and loaders. Runs use :class:`data_modules.multi.AnomalyDataModule`,
    which holds one or more sources.

    A family whose ``reads_source`` is true reads ``dataset.source`` in place (no ``mode=prepare``).

    Args:
        root: the dataset in MVTec AD layout.
        name: dataset name used in reports (``<name>/<class>``).
        classes: classes to use; ``None`` = every class folder under ``root``.
        image_size: centre crop (392 in the original); ``resize``: square resize before it (448).
        batch_size / test_batch_size / num_workers: loader settings.
        component_masks: folder of cached component masks (``mode=segment``) or None.
        jitter: colour-jitter strength for the global experts' input.
        eval_jitter: also jitter at test time, like the original (non-deterministic; SPEC B4).
        gt_resize: ``bilinear`` (original; slightly dilates masks) or ``nearest``.
        download_hint: how to get the data, shown when ``root`` is missing.
        val_fraction: share of each class's test images (good and anomalous alike) held out as a
            validation set, e.g. for sweeps; they leave the test set. 0 (default, the original
            protocol): no validation set.
        validation_split: validate on the dataset's own validation split
            (``<class>/validation``, e.g. MVTec LOCO, MVTec 3D-AD, BMAD) when ``val_fraction`` is 0;
            classes without one contribute nothing.
    """

    reads_source = False

    def __init__(
        self,
        root: str,
        name: str,
        classes: Sequence[str] | None = None,
        image_size: int | None = 392,
        resize: int = 448,
        batch_size: int = 8,
        test_batch_size: int = 16,
        num_workers: int = 4,
        component_masks: str | None = None,
        jitter: float = 0.2,
        eval_jitter: bool = False,
        gt_resize: str = "bilinear",
        download_hint: str = "",
        val_fraction: float = 0.0,
        validation_split: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.name = name
        self.classes = list(classes) if classes else None
        self.transforms = AnomalyTransforms(resize, image_size, jitter, gt_resize)
        self.batch_size, self.test_batch_size, self.num_workers = batch_size, test_batch_size, num_workers
        self.component_root = Path(component_masks).expanduser() if component_masks else None
        self.component_folder = self.component_root  # where mode=segment writes them
        self.eval_jitter = eval_jitter
        self.download_hint = download_hint
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction={val_fraction}: use a share in [0, 1), e.g. 0.3")
        self.val_fraction = val_fraction
        self.validation_split = validation_split
        self.train_set: AnomalyDataset | None = None
        self.val_set: AnomalyDataset | None = None
        self.test_set: AnomalyDataset | None = None

    # ------------------------------------------------------------------ listing
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

    def split_samples(self) -> tuple[list[Sample], list[Sample]]:
        """(validation, test) samples: ``val_fraction`` of the test images, else the dataset's own
        validation split when ``validation_split`` is set, else no validation set."""
        test = self.samples("test")
        if self.val_fraction > 0:
            return split_validation(test, self.val_fraction)
        return (self.samples("validation") if self.validation_split else []), test

    @property
    def test_class_keys(self) -> list[str]:
        return [f"{self.name}/{c}" for c in self.class_names()]

    # ------------------------------------------------------------------ datasets
    def sources(self) -> dict[str, SourceDataModule]:
        return {self.name: self}

    def setup(self, stage: str | None = None) -> None:
        keys = self.test_class_keys
        self.check_samples(stage)
        if stage in (None, "fit") and self.train_set is None:
            samples = self.samples("train")
            self.train_set = AnomalyDataset(samples, self.transforms, keys, True, self.component_root)
            log.info("%s: %d training images in %d classes", self.name, len(samples), len(keys))
        wants_val = self.val_fraction > 0 or self.validation_split
        if self.test_set is None and (stage in (None, "test", "predict") or wants_val):
            val, test = self.split_samples()
            self.test_set = AnomalyDataset(test, self.transforms, keys, self.eval_jitter, self.component_root)
            if val:
                self.val_set = AnomalyDataset(val, self.transforms, keys, self.eval_jitter, self.component_root)
            log.info("%s: %d test images, %d held out for validation", self.name, len(test), len(val))

    def normal_dataloader(self, images_per_class: int | None = None) -> DataLoader:
        """Normal training images with the test-time pipeline: statistics of normal data
        (inductive protocol, decision thresholds). Up to ``images_per_class`` per class, evenly
        spaced over the sorted list (``None``: all)."""
        samples = []
        for class_name in self.class_names():
            samples += evenly_spaced(self.list_samples(class_name, "train"), images_per_class)
        dataset = AnomalyDataset(samples, self.transforms, self.test_class_keys, self.eval_jitter, self.component_root)
        log.info("%s: %d normal training images for calibration", self.name, len(samples))
        return self._loader(dataset, self.test_batch_size, train=False)
