"""What the model returns: the records the training losses read and the evaluation result.

Kept apart from the model so that the losses (:mod:`src.losses`) depend on these records only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from torch import Tensor


@dataclass
class PatchRun:
    rows: Tensor  # (n,) batch indices this expert ran on
    de_maps: list[Tensor]  # one (n, C, h, w) decoder map per fuse group
    feature: Tensor  # (n, C) pooled last decoder map, for EIR


@dataclass
class GlobalRun:
    rows: Tensor  # (n,)
    autoencoder: Tensor  # (n, C, h, w)
    student: Tensor  # (n, C, h, w)
    feature: Tensor  # (n, C) pooled student map, for EIR


@dataclass
class ComponentRun:
    rows: Tensor  # (n,) indices into the batch's component vectors
    reconstruction: Tensor  # (n, C)


@dataclass
class TrainOutput:
    logits: Tensor  # (B, E)
    routing_weights: Tensor  # (B, E), k non-zeros per row summing to 1
    expert_mask: Tensor  # (B, E) bool, the top-k experts
    en_maps: list[Tensor]  # (B, C, h, w) encoder targets of the patch experts, per train fuse group
    global_target: Tensor  # (B, C, h, w) target of the global autoencoders
    component_features: Tensor  # (M, C) component vectors of the batch
    component_image: Tensor  # (M,) image index of each component vector
    patch: list[PatchRun | None] = field(default_factory=list)  # None: expert got no image
    global_: list[GlobalRun | None] = field(default_factory=list)
    component: list[ComponentRun | None] = field(default_factory=list)


@dataclass
class MoEPrediction:
    map_patch: Tensor  # (B, 1, H, W) raw patch-expert map at image resolution
    map_global: Tensor  # (B, 1, H, W)
    map_component: Tensor  # (B, 1, H, W)
    routing_weights: Tensor  # (B, E)
    logits: Tensor  # (B, E)
    group_weights: Tensor  # (B, 3) max routing weight of the patch / global / component group

    def select(self, rows: Tensor | list[int]) -> MoEPrediction:
        """The prediction of some images of the batch."""
        return MoEPrediction(*(getattr(self, f.name)[rows] for f in fields(self)))


def split_experts(x: Tensor, num_experts: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(B, E) per-expert columns -> the patch, global and component experts' columns."""
    p, g, _ = num_experts
    return x[:, :p], x[:, p : p + g], x[:, p + g :]
