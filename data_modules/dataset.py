"""From samples to batches: the image pipeline, the Dataset, collation, the loaders and the
training samplers. Sources (:mod:`data_modules.sources`) list samples; the data module
(:mod:`data_modules.datamodule`) decides which samples form which split and builds these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.components import load_component_masks
from data_modules.io import DEFAULT_MAX_PIXELS, open_image
from data_modules.types import IMAGENET_MEAN, IMAGENET_STD, DataError, Sample

log = logging.getLogger(__name__)


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
        max_pixels: images with more pixels are refused (``dataset.max_image_pixels``); an
            attribute of the dataset, so every loader worker has it whatever its start method.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transforms: AnomalyTransforms,
        class_keys: Sequence[str],
        jitter_ae: bool,
        component_root: Path | Mapping[str, Path | None] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.max_pixels = max_pixels
        self.transforms = transforms
        self.class_index = {key: i for i, key in enumerate(class_keys)}
        self.jitter_ae = jitter_ae
        self.component_root = component_root

    def __len__(self) -> int:
        return len(self.samples)

    def display_image(self, index: int) -> np.ndarray:
        """Sample ``index`` resized and cropped like the model input, as (H, W, 3) uint8."""
        return self.transforms.display(open_image(self.samples[index].image_path, max_pixels=self.max_pixels))

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        img = open_image(sample.image_path, max_pixels=self.max_pixels)
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
                mask = open_image(sample.mask_path, "L", self.max_pixels)
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
    :class:`BalancedSampler`)."""
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
