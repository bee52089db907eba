"""AnomalyMoE: a frozen DINOv2 encoder, a top-k gate and three families of experts.

Reads top-down: token fusion helpers, then the model. The model branches on ``self.training``:
training returns what the losses need (:class:`TrainOutput`), evaluation returns the raw
per-group anomaly maps (:class:`MoEPrediction`); both records live in :mod:`src.models.outputs`.

Dispatch: with ``dispatch="sparse"`` (default) each expert runs only on the images routed to
it (gather rows, run, ``index_add_`` back, as in Mixtral); ``dispatch="dense"`` runs every
expert on every image like the original code. Non-selected experts have routing weight 0, so
both give the same maps and loss values (``tests/test_model.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.backbone import DinoV2Backbone
from src.models.experts import (
    ComponentExpert,
    GatingNetwork,
    GlobalExpert,
    PatchExpert,
    pool_component_features,
    pool_component_slots,
    top_k_routing,
)
from src.models.outputs import ComponentRun, GlobalRun, MoEPrediction, PatchRun, TrainOutput, split_experts

__all__ = ["AnomalyMoE", "ComponentRun", "GlobalRun", "MoEPrediction", "PatchRun", "TrainOutput", "fuse", "tokens_to_map"]

log = logging.getLogger(__name__)

DISPATCH_MODES = ("sparse", "dense")


def fuse(taps: Sequence[Tensor], groups: Sequence[Sequence[int]]) -> list[Tensor]:
    """Mean of the listed taps for each group: list of (B, N, C)."""
    return [torch.stack([taps[i] for i in group]).mean(0) for group in groups]


def tokens_to_map(tokens: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) tokens -> (B, C, h, w) patch map, dropping CLS and register tokens."""
    b, _, c = tokens.shape
    return tokens[:, num_prefix:].permute(0, 2, 1).reshape(b, c, *grid)


# --------------------------------------------------------------------------- model
class AnomalyMoE(nn.Module):
    """The AnomalyMoE network (SPEC sections 2-6).

    Args:
        backbone: frozen DINOv2 encoder.
        num_patch_experts, num_global_experts, num_component_experts: experts per group.
        top_k: experts selected per image.
        target_layers: encoder blocks tapped (0-based).
        fuse_groups_train / fuse_groups_eval: groups of tap indices averaged into one map; the
            original trains with two groups and tests with one (SPEC 2.5, B3).
        dispatch: ``"sparse"`` (only routed experts run) or ``"dense"`` (all, like the original).
        decoder_depth, decoder_heads, mlp_ratio, bottleneck_dropout: patch experts.
        ae_channels, student_channels, ae_dropout: global experts (official 32 and (256, 512)).
        component_hidden, component_dropout, component_dilation: component experts.
        gate_hidden: hidden width of the gate.
        exclude_components_without_masks: an image without component masks is not routed to
            component experts (they cannot score it: its component map would be 0 and its
            training loss 0, which pulls the gate towards them). False keeps the original's
            routing, which ignores the masks.
        student_strip_rows: without gradients (inference), compute the global students' two
            full-resolution stages in strips of this many token-grid rows, keeping a fraction of
            their activations in memory (same values); 0: whole images, like the original.

    ``torch.compile`` and channels-last memory are applied from outside
    (:func:`src.models.acceleration.accelerate`).
    """

    def __init__(
        self,
        backbone: DinoV2Backbone,
        num_patch_experts: int = 6,
        num_global_experts: int = 6,
        num_component_experts: int = 6,
        top_k: int = 3,
        target_layers: Sequence[int] = (2, 3, 4, 5, 6, 7, 8, 9),
        fuse_groups_train: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7)),
        fuse_groups_eval: Sequence[Sequence[int]] = ((0, 1, 2, 3, 4, 5, 6, 7),),
        dispatch: str = "sparse",
        decoder_depth: int = 8,
        decoder_heads: int | None = None,
        mlp_ratio: float = 4.0,
        bottleneck_dropout: float = 0.2,
        ae_channels: int = 32,
        student_channels: Sequence[int] = (256, 512),
        ae_dropout: float = 0.2,
        component_hidden: Sequence[int] = (256, 64),
        component_dropout: float = 0.1,
        component_dilation: int = 5,
        gate_hidden: int = 256,
        exclude_components_without_masks: bool = True,
        student_strip_rows: int = 4,
    ) -> None:
        super().__init__()
        self.num_experts = (num_patch_experts, num_global_experts, num_component_experts)
        total = sum(self.num_experts)
        if not 1 <= top_k <= total:
            raise ValueError(f"model.top_k={top_k} must be between 1 and the number of experts ({total})")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"model.dispatch={dispatch!r}; choose one of {DISPATCH_MODES}")
        n_taps = len(target_layers)
        for name, groups in (("fuse_groups_train", fuse_groups_train), ("fuse_groups_eval", fuse_groups_eval)):
            bad = [i for g in groups for i in g if not 0 <= i < n_taps]
            if bad or not groups:
                raise ValueError(f"model.{name}={groups} must index the {n_taps} target_layers (0..{n_taps - 1})")
        if backbone.patch_size != 14:
            raise ValueError(f"the global experts' student assumes patch size 14, backbone has {backbone.patch_size}")

        self.encoder = backbone
        self.top_k = top_k
        self.dispatch = dispatch
        self.target_layers = list(target_layers)
        self.fuse_groups_train = [list(g) for g in fuse_groups_train]
        self.fuse_groups_eval = [list(g) for g in fuse_groups_eval]
        self.component_dilation = component_dilation
        self.exclude_components_without_masks = exclude_components_without_masks
        dim = backbone.embed_dim
        heads = decoder_heads or backbone.vit.blocks[0].attn.num_heads
        self.patch_experts = nn.ModuleList(
            PatchExpert(dim, heads, decoder_depth, mlp_ratio, bottleneck_dropout) for _ in range(num_patch_experts)
        )
        self.global_experts = nn.ModuleList(
            GlobalExpert(dim, ae_channels, tuple(student_channels), ae_dropout, student_strip_rows)
            for _ in range(num_global_experts)
        )
        self.component_experts = nn.ModuleList(
            ComponentExpert(dim, tuple(component_hidden), component_dropout) for _ in range(num_component_experts)
        )
        self.gating_network = GatingNetwork(dim, total, gate_hidden)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def trainable_groups(self) -> dict[str, nn.Module]:
        return {
            "patch_experts": self.patch_experts,
            "global_experts": self.global_experts,
            "component_experts": self.component_experts,
            "gating_network": self.gating_network,
        }

    def reset_parameters(self) -> None:
        """The original's init (SPEC 7.8): Linear ~ truncnormal(0, 0.01, +-0.03), bias 0; LN (1, 0).

        Every Linear is drawn separately, so experts built alike start different (SPEC B9).
        Convolutions keep PyTorch's default init.
        """
        for group in self.trainable_groups().values():
            for m in group.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def expert_counts(self) -> dict[str, int]:
        p, g, k = self.num_experts
        return {"patch_experts": p, "global_experts": g, "component_experts": k}

    # ------------------------------------------------------------------ shared pieces
    def _rows(self, mask_column: Tensor) -> Tensor:
        """Batch rows an expert runs on: all rows (dense) or the rows routed to it (sparse)."""
        if self.dispatch == "dense":
            return torch.arange(mask_column.shape[0], device=mask_column.device)
        return mask_column.nonzero(as_tuple=True)[0]

    def _scatter_add(self, target: Tensor, rows: Tensor, values: Tensor) -> Tensor:
        """``target`` with ``values`` added to its ``rows``; dense dispatch runs on every row, so a
        plain sum (which the ONNX export translates faithfully, unlike an in-place ``index_add_``)."""
        if self.dispatch == "dense":
            return target + values
        return target.index_add_(0, rows, values)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, E) per-expert columns -> the patch, global and component experts' columns."""
        return split_experts(x, self.num_experts)

    def encode(self, image: Tensor, image_ae: Tensor | None) -> tuple[list[Tensor], list[Tensor] | None, Tensor, tuple[int, int]]:
        """Tapped tokens of ``image`` (and of ``image_ae`` when given) in one batched pass, which
        stops at the deepest tapped block for ``image_ae``; CLS token and token grid of ``image``."""
        b = image.shape[0]
        with torch.no_grad():
            if image_ae is None:
                out = self.encoder(image, self.target_layers)
                return out.taps, None, out.cls, out.grid
            out = self.encoder(torch.cat([image, image_ae]), self.target_layers, cls_batch=b)
        return [t[:b] for t in out.taps], [t[b:] for t in out.taps], out.cls, out.grid

    def _route(self, cls: Tensor, num_masks: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Gate logits (B, E) and the top-k routing weights and mask."""
        logits = self.gating_network(cls)
        p, g, k = self.num_experts
        if not (self.exclude_components_without_masks and k and p + g):
            weights, mask = top_k_routing(logits, self.top_k)
            return logits, weights, mask
        # An image without component masks may only pick patch and global experts: with top_k
        # above their number it gets fewer experts, its weights renormalised over them.
        no_masks = torch.ones_like(logits[:, 0], dtype=torch.bool) if num_masks is None else num_masks == 0
        blocked = torch.zeros_like(logits, dtype=torch.bool)
        blocked[:, p + g :] = no_masks[:, None]
        weights, mask = top_k_routing(logits.masked_fill(blocked, float("-inf")), self.top_k)  # softmax: 0 on -inf
        return logits, weights, mask & ~blocked

    def _patch_runs(self, taps: list[Tensor], groups: list[list[int]], mask: Tensor, grid) -> list[PatchRun | None]:
        prefix = self.encoder.num_prefix_tokens
        bottleneck_in = torch.stack(taps).mean(0)  # (B, N, C): all tapped blocks, all tokens
        runs: list[PatchRun | None] = []
        for i, expert in enumerate(self.patch_experts):
            rows = self._rows(mask[:, i])
            if rows.numel() == 0:
                runs.append(None)
                continue
            de = expert(bottleneck_in[rows])
            de_maps = [tokens_to_map(t, prefix, grid) for t in fuse(de, groups)]
            runs.append(PatchRun(rows, de_maps, de_maps[-1].mean(dim=(2, 3))))
        return runs

    def _global_runs(self, image_ae: Tensor, mask: Tensor, grid) -> list[GlobalRun | None]:
        runs: list[GlobalRun | None] = []
        for j, expert in enumerate(self.global_experts):
            rows = self._rows(mask[:, j])
            if rows.numel() == 0:
                runs.append(None)
                continue
            ae, student = expert(image_ae[rows], grid)
            runs.append(GlobalRun(rows, ae, student, student.mean(dim=(2, 3))))
        return runs

    def _component_runs(self, features: Tensor, image_index: Tensor, mask: Tensor) -> list[ComponentRun | None]:
        runs: list[ComponentRun | None] = []
        for m, expert in enumerate(self.component_experts):
            rows = self._rows(mask[image_index, m]) if features.shape[0] else image_index[:0]
            runs.append(ComponentRun(rows, expert(features[rows])) if rows.numel() else None)
        return runs

    def _components(self, taps: list[Tensor], masks: Tensor | None, num_masks: Tensor | None, grid) -> tuple[Tensor, Tensor]:
        """Component vectors pooled from the mean of all tapped blocks (SPEC 5.2)."""
        feature_map = tokens_to_map(torch.stack(taps).mean(0), self.encoder.num_prefix_tokens, grid)
        if masks is None or num_masks is None or len(self.component_experts) == 0:
            return feature_map.new_zeros(0, feature_map.shape[1]), torch.zeros(0, dtype=torch.long, device=feature_map.device)
        return pool_component_features(feature_map, masks, num_masks, self.component_dilation)

    def _component_map_sparse(self, taps: list[Tensor], masks: Tensor, num_masks: Tensor, w_k: Tensor,
                              mask_k: Tensor, grid, dtype: torch.dtype) -> Tensor:
        """(B, 1, H, W) component map with each component expert on the real masks routed to it."""
        features, image_index = self._components(taps, masks, num_masks, grid)
        if not features.shape[0]:
            return masks.new_zeros(masks.shape[0], 1, *masks.shape[-2:], dtype=dtype)
        scores = features.new_zeros(features.shape[0], dtype=dtype)  # accumulated in the input's dtype
        for m, run in enumerate(self._component_runs(features, image_index, mask_k)):
            if run is not None:
                distance = 1 - F.cosine_similarity(run.reconstruction, features[run.rows], dim=1)
                scores.index_add_(0, run.rows, (w_k[image_index[run.rows], m] * distance).to(scores.dtype))
        per_mask = masks.new_zeros(masks.shape[:2], dtype=scores.dtype)  # (B, K), padding scores 0
        valid = torch.arange(masks.shape[1], device=masks.device)[None] < num_masks[:, None]
        per_mask[valid] = scores
        return (per_mask[:, :, None, None] * masks.to(scores.dtype)).amax(dim=1, keepdim=True)

    def _component_map_dense(self, taps: list[Tensor], masks: Tensor, num_masks: Tensor, w_k: Tensor, grid,
                             dtype: torch.dtype) -> Tensor:
        """(B, 1, H, W) component map with every component expert on every mask slot, padding
        included and scored 0: no shape depends on the data, so the graph exports (``mode=export``)."""
        feature_map = tokens_to_map(torch.stack(taps).mean(0), self.encoder.num_prefix_tokens, grid)
        slots = pool_component_slots(feature_map, masks, self.component_dilation)  # (B, K, C)
        scores = slots.new_zeros(slots.shape[:2], dtype=dtype)  # (B, K)
        for m, expert in enumerate(self.component_experts):
            distance = 1 - F.cosine_similarity(expert(slots), slots, dim=-1)  # (B, K)
            scores = scores + (w_k[:, m, None] * distance).to(dtype)
        valid = torch.arange(masks.shape[1], device=masks.device)[None] < num_masks[:, None]  # (B, K)
        per_mask = torch.where(valid, scores, torch.zeros_like(scores))
        return (per_mask[:, :, None, None] * masks.to(dtype)).amax(dim=1, keepdim=True)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image: Tensor,
        image_ae: Tensor | None = None,
        masks: Tensor | None = None,
        num_masks: Tensor | None = None,
    ) -> TrainOutput | MoEPrediction:
        """``image``: (B, 3, H, W) normalised; ``image_ae``: the global experts' input (defaults
        to ``image``); ``masks``: (B, K, H, W) component masks with ``num_masks`` (B,) real ones."""
        if self.training:
            return self.forward_train(image, image_ae, masks, num_masks)
        return self.forward_eval(image, image_ae, masks, num_masks)

    def forward_train(self, image, image_ae=None, masks=None, num_masks=None) -> TrainOutput:
        """Everything the training losses need. Callable in eval mode (no dropout) for checks."""
        image_ae = image if image_ae is None else image_ae
        groups = self.fuse_groups_train
        taps, taps_ae, cls, grid = self.encode(image, image_ae)
        prefix = self.encoder.num_prefix_tokens
        logits, weights, mask = self._route(cls, num_masks)
        mask_p, mask_g, mask_k = self.split(mask)
        en_maps = [tokens_to_map(t, prefix, grid) for t in fuse(taps, groups)]
        target = tokens_to_map(fuse(taps_ae, groups)[-1], prefix, grid)
        features, image_index = self._components(taps, masks, num_masks, grid)
        return TrainOutput(
            logits=logits,
            routing_weights=weights,
            expert_mask=mask,
            en_maps=en_maps,
            global_target=target,
            component_features=features,
            component_image=image_index,
            patch=self._patch_runs(taps, groups, mask_p, grid),
            global_=self._global_runs(image_ae, mask_g, grid),
            component=self._component_runs(features, image_index, mask_k),
        )

    def forward_eval(self, image, image_ae=None, masks=None, num_masks=None) -> MoEPrediction:
        """Raw per-group anomaly maps at image resolution (SPEC 8.1)."""
        image_ae = image if image_ae is None else image_ae
        b, _, height, width = image.shape
        taps, _, cls, grid = self.encode(image, None)
        prefix = self.encoder.num_prefix_tokens
        logits, weights, mask = self._route(cls, num_masks)
        (w_p, w_g, w_k), (mask_p, mask_g, mask_k) = self.split(weights), self.split(mask)
        en_map = tokens_to_map(fuse(taps, self.fuse_groups_eval)[-1], prefix, grid)

        # Maps accumulate in the input's dtype; under bf16 autocast the expert outputs are bf16.
        map_p = image.new_zeros(b, *grid)
        for i, run in enumerate(self._patch_runs(taps, self.fuse_groups_eval, mask_p, grid)):
            if run is not None:
                distance = 1 - F.cosine_similarity(en_map[run.rows], run.de_maps[-1], dim=1)  # (n, h, w)
                map_p = self._scatter_add(map_p, run.rows, (w_p[run.rows, i, None, None] * distance).to(map_p.dtype))

        map_g = image.new_zeros(b, *grid)
        for j, run in enumerate(self._global_runs(image_ae, mask_g, grid)):
            if run is not None:
                distance = (run.autoencoder - run.student).pow(2).mean(dim=1)  # (n, h, w)
                map_g = self._scatter_add(map_g, run.rows, (w_g[run.rows, j, None, None] * distance).to(map_g.dtype))

        map_k = image.new_zeros(b, 1, height, width)
        has_masks = masks is not None and num_masks is not None and masks.shape[1] > 0 and len(self.component_experts) > 0
        if has_masks and self.dispatch == "dense":
            map_k = self._component_map_dense(taps, masks, num_masks, w_k, grid, image.dtype)
        elif has_masks:
            map_k = self._component_map_sparse(taps, masks, num_masks, w_k, mask_k, grid, image.dtype)

        size = (height, width)
        return MoEPrediction(
            map_patch=F.interpolate(map_p.unsqueeze(1), size=size, mode="bilinear"),
            map_global=F.interpolate(map_g.unsqueeze(1), size=size, mode="bilinear"),
            map_component=map_k,
            routing_weights=weights,
            logits=logits,
            group_weights=torch.stack(
                [w.amax(dim=1) if w.shape[1] else w.new_zeros(b) for w in (w_p, w_g, w_k)], dim=1
            ),
        )
