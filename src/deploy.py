"""The deployable detector: one graph from resized uint8 images to anomaly maps, scores and decisions.

:class:`DeployableDetector` wraps a trained model with everything ``mode=predict`` does to a new
image after decoding and resizing it (:mod:`src.modes.predict`), through the same functions:

1. ``/255`` and the ImageNet normalisation (``AnomalyTransforms.image`` after its PIL resize and crop);
2. with part prototypes (``segment_image`` given): the class whose prototypes lie nearest to the
   image's features (the backbone's, or mean colours, as the prototypes were fitted on)
   (:meth:`src.segment.online.OnlineSegmenter.choose_class`), unless ``class_index`` names it; the
   part scores of that class's prototypes, the mean-field refinement
   (:func:`src.segment.refine.refine`, its 3x3 inverses by cofactors and its per-pixel products as
   broadcast sums), the argmax, the kept slots, and the nearest resizing of the masks to the model's
   input (index maps from the runtime);
3. the gate and all experts (dense dispatch: every expert runs, the gate's weights zero the
   others; :meth:`src.models.anomalymoe.AnomalyMoE.forward_eval`);
4. the scorer (:class:`src.evaluation.scorer.Scorer`) with the chosen class's calibration
   statistics, and the decision ``score >= threshold``.

The class tables (prototypes, kept slots, statistics) are padded to the largest class and held as
buffers, so they become constants of the exported graph. What stays outside is what a graph cannot
do exactly: decoding the file and PIL's antialiased resizes (:mod:`src.inference` does them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.types import IMAGENET_MEAN, IMAGENET_STD
from src.evaluation.calibration import POOLED, Calibration
from src.evaluation.scorer import Scorer, raw_groups
from src.models.anomalymoe import AnomalyMoE
from src.segment.features import backbone_grid, color_grid
from src.segment.online import PartSegmentation
from src.segment.refine import RefineSettings, refine

PAD_SCORE = -1e30  # part score of a padding slot: probability exactly 0 after the softmax
OUTPUTS = ("anomaly_map", "score", "anomalous", "class_index", "class_distance", "threshold", "routing_weights")


@dataclass
class Preprocessing:
    """What the runtime does before the graph (``dataset.resize``, ``dataset.image_size``, the
    segmentation's square working size; None without part prototypes)."""

    resize: int
    crop: int | None
    segment_size: int | None

    @property
    def input_size(self) -> int:
        return self.crop or self.resize


class DeployableDetector(nn.Module):
    """Inputs: ``image`` (B, 3, S, S) uint8, the image PIL-resized to ``resize`` and centre-cropped
    to S; ``given_class`` (B,) int64, the class index or -1 to choose; with prototypes also ``segment_image``
    (B, 3, s, s) uint8 (PIL-resized to the segmentation size) and ``mask_rows``/``mask_cols``
    (B, S) int64 (for each input pixel, its row/column in ``segment_image`` after the nearest
    resizes of ``mode=predict``). Outputs: :data:`OUTPUTS`."""

    def __init__(self, net: AnomalyMoE, scorer: Scorer, calibration: Calibration, class_keys: list[str],
                 segmentation: PartSegmentation | None) -> None:
        super().__init__()
        if net.dispatch != "dense":
            raise ValueError("the exported graph runs every expert: build the model with model.dispatch=dense")
        self.net, self.scorer, self.class_keys = net.eval(), scorer, list(class_keys)
        self.segmentation = segmentation
        masked = segmentation is not None or net.num_experts[2] == 0
        # each class's statistics, then the pooled ones (the rows of the tables below; model.json lists them)
        self.statistics = {k: calibration.get(k, masks=masked) for k in [*self.class_keys, POOLED]}
        stats = list(self.statistics.values())
        self.register_buffer("stat_low", torch.tensor([s.low for s in stats]))  # (N + 1, G)
        self.register_buffer("stat_high", torch.tensor([s.high for s in stats]))
        self.register_buffer("stat_threshold", torch.tensor([s.threshold for s in stats]))  # (N + 1,)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN)[:, None, None])
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD)[:, None, None])
        if segmentation is None:
            return
        missing = [k for k in self.class_keys if k not in segmentation.classes]
        if missing:
            raise ValueError(f"no part prototypes for classes {missing}")
        parts = [segmentation.classes[k] for k in self.class_keys]
        k_max, kept_max = max(len(p.prototypes.centres) for p in parts), max(max(len(p.kept) for p in parts), 1)
        dim = parts[0].prototypes.centres.shape[1]
        centres = torch.zeros(len(parts), k_max, dim)
        valid = torch.zeros(len(parts), k_max, dtype=torch.bool)
        kept = torch.full((len(parts), kept_max), -1, dtype=torch.long)  # -1: a padding mask (never a label)
        features = dict(segmentation.params["features"])
        self.feature_kind = features["kind"]
        if self.feature_kind not in ("backbone", "color"):
            raise ValueError(f"segmentation features {features!r}: only backbone or colour features export")
        self.normalize = self.feature_kind == "backbone"  # backbone prototypes compare by cosine
        for i, p in enumerate(parts):
            if p.prototypes.normalize != self.normalize:
                raise ValueError(f"class {self.class_keys[i]}: its prototypes do not match the {self.feature_kind} "
                                 "features of the segmentation")
            centres[i, : len(p.prototypes.centres)] = torch.from_numpy(p.prototypes.centres)
            valid[i, : len(p.prototypes.centres)] = True
            kept[i, : len(p.kept)] = torch.tensor(p.kept, dtype=torch.long)
        self.register_buffer("part_centres", centres)  # (N, K, C)
        self.register_buffer("part_valid", valid)  # (N, K)
        self.register_buffer("part_variance", torch.tensor([p.prototypes.variance for p in parts]))  # (N,)
        self.register_buffer("part_kept", kept)  # (N, Kk)
        self.register_buffer("part_count", torch.tensor([len(p.kept) for p in parts]))  # (N,)
        if self.feature_kind == "backbone":
            self.blocks = sorted(int(b) for b in features["blocks"])
        else:
            self.color_space, self.color_stride = str(features["space"]), int(features["stride"])
        self.refine_settings = RefineSettings(**segmentation.params["refine"])

    # ------------------------------------------------------------------ pieces
    def class_distances(self, vectors: Tensor) -> Tensor:
        """(B, P, C) features (normalised for backbone prototypes) -> (B, N, P, K) squared distances to every class's centres,
        +inf for padding centres."""
        d2 = torch.cdist(vectors[:, None], self.part_centres[None]) ** 2  # (B, N, P, K)
        return d2.masked_fill(~self.part_valid[None, :, None, :], float("inf"))

    def component_masks(self, segment_image: Tensor, class_index: Tensor, rows: Tensor, cols: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Masks (B, Kk, S, S) uint8, their count (B,), the class used (B,) and the per-class mean
        distances (B, N) of ``mode=predict``'s online segmentation."""
        image = segment_image.float() / 255  # (B, 3, s, s) in [0, 1], as to_tensor
        if self.feature_kind == "backbone":
            grid = backbone_grid(self.net.encoder, self.blocks, image)  # (B, C, h, w)
        else:
            grid = color_grid(image, self.color_space, self.color_stride)  # (B, 3, h, w)
        b, _, h, w = grid.shape
        vectors = grid.flatten(2).transpose(1, 2)  # (B, P, C)
        if self.normalize:
            vectors = F.normalize(vectors, dim=-1)
        d2 = self.class_distances(vectors)  # (B, N, P, K)
        distances = d2.amin(-1).mean(-1)  # (B, N)
        chosen = torch.where(class_index >= 0, class_index, distances.argmin(1))  # (B,)
        d2_class = d2.gather(1, chosen[:, None, None, None].expand(-1, 1, *d2.shape[2:]))[:, 0]  # (B, P, K)
        scores = -d2_class / (2 * self.part_variance[chosen][:, None, None])
        scores = torch.where(torch.isinf(d2_class), torch.full_like(scores, PAD_SCORE), scores)
        scores = scores.transpose(1, 2).reshape(b, -1, h, w)  # (B, K, h, w)
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=False)
        labels = refine(scores, image, self.refine_settings, exported=True).argmax(1)  # (B, s, s)
        size = rows.shape[1]
        labels = labels.gather(1, rows[:, :, None].expand(-1, -1, labels.shape[2]))  # (B, S, s)
        labels = labels.gather(2, cols[:, None, :].expand(-1, size, -1))  # (B, S, S)
        masks = (labels[:, None] == self.part_kept[chosen][:, :, None, None]).to(torch.uint8)  # (B, Kk, S, S)
        return masks, self.part_count[chosen], chosen, distances

    # ------------------------------------------------------------------ forward
    def forward(self, image: Tensor, given_class: Tensor, segment_image: Tensor | None = None,
                mask_rows: Tensor | None = None, mask_cols: Tensor | None = None) -> tuple[Tensor, ...]:
        x = (image.float() / 255 - self.pixel_mean) / self.pixel_std  # (B, 3, S, S), as to_tensor + Normalize
        class_index, masks, num_masks = given_class, None, None
        distances = x.new_zeros(x.shape[0], len(self.class_keys))
        if self.segmentation is not None:
            masks, num_masks, class_index, distances = self.component_masks(segment_image, class_index, mask_rows,
                                                                             mask_cols)
        else:
            default = 0 if len(self.class_keys) == 1 else len(self.class_keys)  # one class: its own; else pooled
            class_index = torch.where(class_index >= 0, class_index, torch.full_like(class_index, default))
        prediction = self.net(x, None, masks, num_masks)
        raw = raw_groups(prediction)
        low, high = self.stat_low[class_index], self.stat_high[class_index]  # (B, G)
        final = self.scorer.final_maps(self.scorer.smoothed_groups(raw), low, high,
                                       prediction.group_weights)
        scores = self.scorer.image_scores(final)
        threshold = self.stat_threshold[class_index]
        return final, scores, scores >= threshold, class_index, distances, threshold, prediction.routing_weights
