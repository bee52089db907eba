"""Streaming, DDP-aware evaluation with bounded memory: the test metrics and the normal-data calibration.

Per test image only small statistics stay in memory: dataset index, class, label, each group's
raw-map minimum and maximum, routing weights. Each group's raw map, resized to 256 px and
smoothed (``L(M)`` of :mod:`src.evaluation.protocol`), goes to a :class:`MapStore`, which keeps
up to ``memory_budget_mb`` in memory and writes the rest to temporary files. ``compute()``
replays the store twice per process: first for image scores and each class's map range, then for
the pixel histograms of :mod:`src.evaluation.metrics`. Full-resolution maps are never kept.

Under several processes (DDP) each process holds the images it evaluated; the small statistics
are gathered, each dataset index is kept once (``DistributedSampler`` pads the last batches with
repeated samples; the first copy wins) and every image is replayed only by the process that
holds its first copy. Scores, ranges, histograms and kept maps are then summed / reduced over
processes, so every image counts exactly once and all processes return the same results.

Protocols (``protocol``):

* ``paper`` (SPEC 8.2): each group's map is min-max normalised with the minimum and maximum
  over the class's whole test set (transductive: a score depends on the other test images).
* ``inductive``: the minimum and maximum come from normal calibration images
  (:class:`NormalCalibrator`), so each image is scored on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from src.evaluation.calibration import GROUPS, POOLED, Calibration, NormalStatistics
from src.evaluation.metrics import PIXEL_METRICS, PixelHistograms, image_metrics, pixel_metrics
from src.evaluation.protocol import resize_ground_truth
from src.evaluation.scorer import Scorer, ScoredImages, raw_groups
from src.evaluation.store import MapStore, release_freed_memory
from src.models.anomalymoe import MoEPrediction

log = logging.getLogger(__name__)

PROTOCOLS = {
    "paper": "each group's map min-max normalised over the class's whole test set (transductive, as the original)",
    "inductive": "each group's map min-max normalised with statistics of normal training images only; "
    "each image is scored on its own",
}
_STATES = ("sample_index", "class_index", "label", "has_gt", "minimum", "maximum", "group_weights", "routing", "rank", "row")


@dataclass
class ClassEvaluation:
    """Everything computed for one class; per-image tensors are in dataset-index order."""

    sample_index: Tensor  # (N,) dataset indices, sorted
    labels: Tensor  # (N,) 0 normal / 1 anomalous
    image_scores: Tensor  # (N,)
    routing_weights: Tensor  # (N, E)
    metrics: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why a metric is undefined, degenerate inputs
    example_index: Tensor | None = None  # (K,) dataset indices of the kept final maps
    example_maps: Tensor | None = None  # (K, 1, S, S) final anomaly maps of those images
    example_gt: Tensor | None = None  # (K, 1, S, S) bool ground truth
    pixel_threshold: float | None = None  # the threshold of the best pixel F1 (predicted masks)

    def example(self, dataset_index: int) -> tuple[Tensor, Tensor]:
        """Kept final map and ground truth of one image: (1, S, S) each."""
        assert self.example_index is not None
        pos = (self.example_index == dataset_index).nonzero()
        if pos.numel() == 0:
            raise KeyError(f"no kept map for dataset index {dataset_index}")
        return self.example_maps[int(pos[0])], self.example_gt[int(pos[0])]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


class _MapAccumulator(Metric):
    """Collects per-image statistics and stores smoothed group maps (see the module docstring).

    Reads from the batch: ``index`` (dataset index), ``class_index``, ``label``, ``image_path``
    (for error messages) and, when ``with_gt``, ``gt_mask`` (B, 1, H, W) and ``has_gt`` (B,):
    False for an anomalous image without a ground-truth mask (a dataset with image labels only),
    which is left out of the pixel metrics.
    """

    full_state_update = False
    with_gt = True

    def __init__(
        self,
        eval_size: int = 256,
        kernel_size: int = 5,
        sigma: float = 4.0,
        top_fraction: float = 0.01,
        memory_budget_mb: float = 512,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.eval_size, self.kernel_size, self.sigma, self.top_fraction = eval_size, kernel_size, sigma, top_fraction
        self.scorer = Scorer(eval_size, kernel_size, sigma, top_fraction)
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.store = MapStore(memory_budget_mb, spill_dir)

    def score(self, prediction: MoEPrediction, stats: NormalStatistics) -> ScoredImages:
        """A batch scored with fixed statistics, each image on its own (:meth:`Scorer.score`)."""
        return self.scorer.score(prediction, stats)

    def update(self, prediction: MoEPrediction, batch: dict) -> None:  # type: ignore[override]
        raw = raw_groups(prediction)  # (B, G, H, W)
        finite = torch.isfinite(raw).flatten(1).all(1)
        if not bool(finite.all()):
            paths = [p for p, ok in zip(batch.get("image_path", range(len(finite))), finite.tolist()) if not ok]
            raise FloatingPointError(f"anomaly maps contain NaN or inf for {len(paths)} image(s), e.g. {paths[:3]}; "
                                     "the checkpoint or the input is broken")
        b = raw.shape[0]
        maps = {"smoothed": self.scorer.smoothed_groups(raw)}
        if self.with_gt:
            maps["gt"] = resize_ground_truth(batch["gt_mask"], self.eval_size).squeeze(1)  # (B, S, S) bool
        start = self.store.append(**maps)
        release_freed_memory()
        device = raw.device
        self.sample_index.append(torch.as_tensor(batch["index"], device=device))
        self.class_index.append(torch.as_tensor(batch["class_index"], device=device))
        self.label.append(torch.as_tensor(batch["label"], device=device))
        has_gt = batch.get("has_gt")
        self.has_gt.append(torch.ones(b, dtype=torch.bool, device=device) if has_gt is None
                           else torch.as_tensor(has_gt, dtype=torch.bool, device=device))
        self.minimum.append(raw.amin(dim=(2, 3)))
        self.maximum.append(raw.amax(dim=(2, 3)))
        self.group_weights.append(prediction.group_weights)
        self.routing.append(prediction.routing_weights)
        self.rank.append(torch.full((b,), _rank(), device=device))
        self.row.append(torch.arange(start, start + b, device=device))

    def reset(self) -> None:
        super().reset()
        self.store.clear()

    def evaluate(self):
        """Gather every process's statistics (torchmetrics sync), then :meth:`_evaluate`.

        Use this rather than ``compute()``: torchmetrics' ``compute()`` wrapper squeezes
        one-element tensors (a class with one image) inside the returned dataclasses.
        """
        with self.sync_context(should_sync=self._to_sync):
            return self._evaluate()

    def compute(self):
        return self._evaluate()

    def _evaluate(self):
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for evaluate()
    def _empty(self) -> bool:
        """No image seen (after a sync the list states are single tensors)."""
        state = self.sample_index
        return len(state) == 0 if isinstance(state, list) else state.numel() == 0

    def _gathered_state(self) -> dict[str, Tensor]:
        """Every process's per-image statistics (already gathered by torchmetrics), each dataset index once."""
        state = {name: dim_zero_cat(getattr(self, name)).cpu() for name in _STATES}
        index = state["sample_index"]
        order = torch.argsort(index, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = index[order][1:] != index[order][:-1]
        keep = order[first]  # sorted by dataset index; the first copy (lowest process) of each
        return {k: v[keep] for k, v in state.items()}

    def _replay(self, state: dict[str, Tensor], low: Tensor, high: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """``(positions, final maps (n, 1, S, S), gt (n, S, S) or None)`` of the rows this process owns."""
        mine = (state["rank"] == _rank()).nonzero(as_tuple=True)[0]
        lookup = torch.full((len(self.store),), -1, dtype=torch.long)
        lookup[state["row"][mine]] = mine
        for start, chunk in self.store.chunks():
            release_freed_memory()
            rows = torch.arange(start, start + chunk["smoothed"].shape[0])
            pos = lookup[rows]
            sel = pos >= 0
            if not bool(sel.any()):
                continue
            pos = pos[sel]
            final = self.scorer.final_maps(chunk["smoothed"][sel], low[pos], high[pos], state["group_weights"][pos])
            yield pos, final, (chunk["gt"][sel] if "gt" in chunk else None)

    def _reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum / min / max over processes (a no-op in one process)."""
        if not _distributed():
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device, op=ops[op])
        return on_device.cpu()

    def _scores(self, state: dict[str, Tensor], low: Tensor, high: Tensor) -> Tensor:
        """(N,) image scores of all processes' images."""
        scores = torch.zeros(state["sample_index"].numel(), dtype=torch.float64)
        for pos, final, _ in self._replay(state, low, high):
            scores[pos] = self.scorer.image_scores(final).double()
        return self._reduce(scores)


class AnomalyEvaluator(_MapAccumulator):
    """Test metrics per class with the ``paper`` or ``inductive`` protocol (module docstring); results from :meth:`evaluate`.

    Args:
        protocol: ``paper`` or ``inductive``; the inductive one needs :attr:`normalization`.
        eval_size, kernel_size, sigma, top_fraction: the protocol (256 px, 5x5 Gaussian with
            sigma 4, image score = mean of the top 1 % pixels).
        num_bins: histogram bins of the pixel metrics per class.
        fpr_limit: integration limit of AUPRO.
        keep_maps: final maps kept per class at each end of the score ranking (overlays).
        memory_budget_mb: smoothed maps kept in memory before spilling to ``spill_dir``.
    """

    def __init__(
        self,
        protocol: str = "paper",
        eval_size: int = 256,
        kernel_size: int = 5,
        sigma: float = 4.0,
        top_fraction: float = 0.01,
        num_bins: int = 65536,
        fpr_limit: float = 0.3,
        keep_maps: int = 3,
        memory_budget_mb: float = 512,
        spill_dir: str | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"evaluation.protocol={protocol!r}; choose one of {sorted(PROTOCOLS)}")
        super().__init__(eval_size, kernel_size, sigma, top_fraction, memory_budget_mb, spill_dir)
        self.protocol, self.num_bins, self.fpr_limit, self.keep_maps = protocol, num_bins, fpr_limit, keep_maps
        self.normalization: dict[int, NormalStatistics] | None = None  # inductive: class index -> statistics

    def _statistics(self, state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(N, G) low and high used to normalise each image's group maps."""
        classes = state["class_index"]
        low, high = torch.empty_like(state["minimum"]), torch.empty_like(state["maximum"])
        for cls in classes.unique().tolist():
            sel = classes == cls
            if self.protocol == "paper":
                low[sel], high[sel] = state["minimum"][sel].amin(0), state["maximum"][sel].amax(0)
            else:
                if not self.normalization or cls not in self.normalization:
                    raise RuntimeError(f"inductive protocol: no normal-image statistics for class index {cls}")
                low[sel], high[sel] = self.normalization[cls].tensors()
        return low, high

    def _evaluate(self) -> dict[int, ClassEvaluation]:
        if self._empty():
            return {}
        state = self._gathered_state()
        classes = state["class_index"]
        class_ids = classes.unique().tolist()
        slot = torch.full((max(class_ids) + 1,), -1, dtype=torch.long)
        slot[class_ids] = torch.arange(len(class_ids))
        low, high = self._statistics(state)

        # Pass 1: image scores and each class's final-map range.
        scores = torch.zeros(classes.numel(), dtype=torch.float64)
        map_min = torch.full((len(class_ids),), float("inf"), dtype=torch.float64)
        map_max = torch.full((len(class_ids),), float("-inf"), dtype=torch.float64)
        for pos, final, _ in self._replay(state, low, high):
            scores[pos] = self.scorer.image_scores(final).double()
            flat = final.flatten(1).double()
            map_min.scatter_reduce_(0, slot[classes[pos]], flat.amin(1), "amin")
            map_max.scatter_reduce_(0, slot[classes[pos]], flat.amax(1), "amax")
        scores, map_min, map_max = self._reduce(scores), self._reduce(map_min, "min"), self._reduce(map_max, "max")

        # The images whose maps are kept: highest and lowest scores of each class.
        kept = []
        for cls in class_ids:
            members = (classes == cls).nonzero(as_tuple=True)[0]
            order = members[torch.argsort(scores[members], descending=True, stable=True)]
            n = min(self.keep_maps, order.numel())
            kept.append(torch.cat([order[:n], order[order.numel() - n :]]).unique())
        kept = torch.cat(kept)
        kept_slot = torch.full((classes.numel(),), -1, dtype=torch.long)
        kept_slot[kept] = torch.arange(kept.numel())

        # Pass 2: pixel histograms, and the kept maps.
        hists = [PixelHistograms(float(map_min[s]), float(map_max[s]), self.num_bins) for s in range(len(class_ids))]
        kept_maps = torch.zeros(kept.numel(), 1, self.eval_size, self.eval_size)
        kept_gt = torch.zeros(kept.numel(), 1, self.eval_size, self.eval_size)
        for pos, final, gt in self._replay(state, low, high):
            for s in slot[classes[pos]].unique().tolist():
                sel = (slot[classes[pos]] == s) & state["has_gt"][pos]  # images without a mask: no pixel metrics
                if bool(sel.any()):
                    hists[s].update(final[sel, 0], gt[sel])
            hit = kept_slot[pos] >= 0
            kept_maps[kept_slot[pos[hit]]] = final[hit]
            kept_gt[kept_slot[pos[hit]]] = gt[hit].unsqueeze(1).float()
        hist_state = self._reduce(torch.stack([h.state() for h in hists]))
        kept_maps, kept_gt = self._reduce(kept_maps), self._reduce(kept_gt)

        results = {}
        for s, cls in enumerate(class_ids):
            hists[s].load_state(hist_state[s])
            sel = classes == cls
            image, notes = image_metrics(scores[sel], state["label"][sel])
            pixel, threshold, pixel_notes = self._pixel_metrics(hists[s], state["label"][sel], state["has_gt"][sel])
            mine = (classes[kept] == cls).nonzero(as_tuple=True)[0]
            results[cls] = ClassEvaluation(
                sample_index=state["sample_index"][sel],
                labels=state["label"][sel],
                image_scores=scores[sel].float(),
                routing_weights=state["routing"][sel],
                metrics={**image, **pixel},
                notes=notes + pixel_notes,
                example_index=state["sample_index"][kept[mine]],
                example_maps=kept_maps[mine],
                example_gt=kept_gt[mine].bool(),
                pixel_threshold=threshold,
            )
        return results

    def _pixel_metrics(self, hist: PixelHistograms, labels: Tensor, has_gt: Tensor) -> tuple[dict, float | None, list[str]]:
        """Pixel metrics of a class over its images with ground truth; null with a note when its
        anomalous images have no masks."""
        anomalous = labels.bool()
        without = int((anomalous & ~has_gt).sum())
        if without and without == int(anomalous.sum()):
            return dict.fromkeys(PIXEL_METRICS), None, [
                "no ground-truth masks for the anomalous images (a dataset with image labels only): pixel metrics are "
                "null, image metrics only"]
        pixel, threshold, notes = pixel_metrics(hist, self.fpr_limit)
        if without:
            notes.append(f"{without} of {int(anomalous.sum())} anomalous images have no ground-truth mask: pixel "
                         "metrics over the others")
        return pixel, threshold, notes


class NormalCalibrator(_MapAccumulator):
    """Normalisation statistics and image-score thresholds from normal images (:mod:`src.evaluation.calibration`).

    Args:
        quantile: the threshold is this quantile of the normal images' scores (1.0: their maximum).
        images_per_class: normal training images per class used (evenly spaced; ``None``: all).
        Others as :class:`AnomalyEvaluator`. Set :attr:`class_keys` before :meth:`evaluate`.
    """

    with_gt = False

    def __init__(
        self,
        quantile: float = 1.0,
        images_per_class: int | None = 50,
        eval_size: int = 256,
        kernel_size: int = 5,
        sigma: float = 4.0,
        top_fraction: float = 0.01,
        memory_budget_mb: float = 512,
        spill_dir: str | None = None,
    ) -> None:
        if not 0 < quantile <= 1:
            raise ValueError(f"evaluation.calibration.quantile={quantile} must be in (0, 1]")
        super().__init__(eval_size, kernel_size, sigma, top_fraction, memory_budget_mb, spill_dir)
        self.quantile, self.images_per_class = quantile, images_per_class
        self.class_keys: list[str] = []

    def _evaluate(self) -> Calibration:
        if self._empty():
            raise RuntimeError("calibration saw no normal images")
        state = self._gathered_state()
        classes, n = state["class_index"], state["class_index"].numel()
        groups = {self._key(c): classes == c for c in classes.unique().tolist()}
        groups[POOLED] = torch.ones(n, dtype=torch.bool)
        bounds = {k: (state["minimum"][sel].amin(0), state["maximum"][sel].amax(0)) for k, sel in groups.items()}
        table = torch.zeros(2, int(classes.max()) + 1, len(GROUPS))
        for c in classes.unique().tolist():
            table[0, c], table[1, c] = bounds[self._key(c)]
        per_class = (table[0, classes], table[1, classes])
        pooled = [bounds[POOLED][i].expand(n, -1) for i in (0, 1)]
        scores = {"class": self._scores(state, *per_class), POOLED: self._scores(state, *pooled)}

        stats, notes = {}, []
        for key, sel in groups.items():
            s = scores[POOLED if key == POOLED else "class"][sel]
            low, high = bounds[key]
            used = state["group_weights"][sel].amax(0) > 0
            for g, name in enumerate(GROUPS):
                if used[g] and high[g] <= low[g]:
                    notes.append(f"{key}: the {name} map is {float(low[g]):.4g} on all {int(sel.sum())} normal images "
                                 "(no range to normalise by): an image where it differs gets a very large score")
            stats[key] = NormalStatistics(
                low=low.tolist(), high=high.tolist(), threshold=float(torch.quantile(s, self.quantile)),
                num_images=int(sel.sum()), score_mean=float(s.mean()), score_max=float(s.max()),
            )
        return Calibration(self.quantile, stats, notes=notes)

    def _key(self, class_index: int) -> str:
        return self.class_keys[class_index] if class_index < len(self.class_keys) else str(class_index)
