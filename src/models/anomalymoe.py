"""AnomalyMoE: a frozen DINOv2 encoder, a top-k gate and three families of experts.

Reads top-down: token fusion helpers, the output records, then the model. The model branches
on ``self.training``: training returns what the losses need (:class:`TrainOutput`), evaluation
returns the raw per-group anomaly maps (:class:`MoEPrediction`).

Dispatch: with ``dispatch="sparse"`` (default) each expert runs only on the images routed to
it (gather rows, run, ``index_add_`` back, as in Mixtral); ``dispatch="dense"`` runs every
expert on every image like the original code. Non-selected experts have routing weight 0, so
both give the same maps and loss values (``tests/test_model.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    top_k_routing,
)

log = logging.getLogger(__name__)

DISPATCH_MODES = ("sparse", "dense")


def fuse(taps: Sequence[Tensor], groups: Sequence[Sequence[int]]) -> list[Tensor]:
    """Mean of the listed taps for each group: list of (B, N, C)."""
    return [torch.stack([taps[i] for i in group]).mean(0) for group in groups]


def tokens_to_map(tokens: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) tokens -> (B, C, h, w) patch map, dropping CLS and register tokens."""
    b, _, c = tokens.shape
    return tokens[:, num_prefix:].permute(0, 2, 1).reshape(b, c, *grid)


# --------------------------------------------------------------------------- outputs
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
        original_encoder_passes: run the encoder like the original: two full passes (image and
            jittered image), at test time too, instead of one batched pass that stops at the
            deepest tapped block for the jittered copy and is skipped at test time. Same tokens;
            only useful to measure the original's cost.
        channels_last: keep the convolutional global experts in channels-last memory format
            (faster convolutions on recent GPUs).
        student_strip_rows: without gradients (inference), compute the global students' two
            full-resolution stages in strips of this many token-grid rows, keeping a fraction of
            their activations in memory (same values); 0: whole images, like the original.
        compile_experts: ``torch.compile`` each patch and global expert (dynamic batch size,
            since sparse dispatch gives each expert a varying number of images), with
            ``compile_backend``.
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
        original_encoder_passes: bool = False,
        channels_last: bool = False,
        compile_experts: bool = False,
        compile_backend: str = "inductor",
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
        self.original_encoder_passes = original_encoder_passes
        self.channels_last = channels_last
        if channels_last:
            self.global_experts.to(memory_format=torch.channels_last)
        # Compiled views share the experts' parameters and stay out of the state dict.
        def maybe_compile(expert: nn.Module):
            return torch.compile(expert, dynamic=True, backend=compile_backend) if compile_experts else expert

        self._run_patch = [maybe_compile(e) for e in self.patch_experts]
        self._run_global = [maybe_compile(e) for e in self.global_experts]

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

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p, g, _ = self.num_experts
        return x[:, :p], x[:, p : p + g], x[:, p + g :]

    def _encode(self, image: Tensor, image_ae: Tensor | None) -> tuple[list[Tensor], list[Tensor] | None, Tensor, tuple[int, int]]:
        """Tapped tokens of ``image`` (and of ``image_ae`` when given) in one batched pass."""
        b = image.shape[0]
        with torch.no_grad():
            if self.original_encoder_passes and image_ae is not None:
                out = self.encoder(image, self.target_layers)
                ae = self.encoder(image_ae, self.target_layers)  # all blocks, as the original
                return out.taps, ae.taps, out.cls, out.grid
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
            de = self._run_patch[i](bottleneck_in[rows])
            de_maps = [tokens_to_map(t, prefix, grid) for t in fuse(de, groups)]
            runs.append(PatchRun(rows, de_maps, de_maps[-1].mean(dim=(2, 3))))
        return runs

    def _global_runs(self, image_ae: Tensor, mask: Tensor, grid) -> list[GlobalRun | None]:
        runs: list[GlobalRun | None] = []
        if self.channels_last:
            image_ae = image_ae.contiguous(memory_format=torch.channels_last)
        for j in range(len(self.global_experts)):
            rows = self._rows(mask[:, j])
            if rows.numel() == 0:
                runs.append(None)
                continue
            ae, student = self._run_global[j](image_ae[rows], grid)
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

    def forward_train(self, image, image_ae=None, masks=None, num_masks=None, fuse_groups=None) -> TrainOutput:
        """Everything the training losses need. Callable in eval mode (no dropout) for checks."""
        image_ae = image if image_ae is None else image_ae
        groups = self.fuse_groups_train if fuse_groups is None else fuse_groups
        taps, taps_ae, cls, grid = self._encode(image, image_ae)
        prefix = self.encoder.num_prefix_tokens
        logits, weights, mask = self._route(cls, num_masks)
        mask_p, mask_g, mask_k = self._split(mask)
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
        # The original also encodes the jittered image at test time, for nothing.
        taps, _, cls, grid = self._encode(image, image_ae if self.original_encoder_passes else None)
        prefix = self.encoder.num_prefix_tokens
        logits, weights, mask = self._route(cls, num_masks)
        (w_p, w_g, w_k), (mask_p, mask_g, mask_k) = self._split(weights), self._split(mask)
        en_map = tokens_to_map(fuse(taps, self.fuse_groups_eval)[-1], prefix, grid)

        map_p = image.new_zeros(b, *grid)
        for i, run in enumerate(self._patch_runs(taps, self.fuse_groups_eval, mask_p, grid)):
            if run is not None:
                distance = 1 - F.cosine_similarity(en_map[run.rows], run.de_maps[-1], dim=1)  # (n, h, w)
                map_p.index_add_(0, run.rows, w_p[run.rows, i, None, None] * distance)

        map_g = image.new_zeros(b, *grid)
        for j, run in enumerate(self._global_runs(image_ae, mask_g, grid)):
            if run is not None:
                distance = (run.autoencoder - run.student).pow(2).mean(dim=1)  # (n, h, w)
                map_g.index_add_(0, run.rows, w_g[run.rows, j, None, None] * distance)

        map_k = image.new_zeros(b, 1, height, width)
        features, image_index = self._components(taps, masks, num_masks, grid)
        if features.shape[0]:
            scores = features.new_zeros(features.shape[0])
            for m, run in enumerate(self._component_runs(features, image_index, mask_k)):
                if run is not None:
                    distance = 1 - F.cosine_similarity(run.reconstruction, features[run.rows], dim=1)
                    scores.index_add_(0, run.rows, w_k[image_index[run.rows], m] * distance)
            per_mask = masks.new_zeros(masks.shape[:2], dtype=scores.dtype)  # (B, K), padding scores 0
            valid = torch.arange(masks.shape[1], device=masks.device)[None] < num_masks[:, None]
            per_mask[valid] = scores
            map_k = (per_mask[:, :, None, None] * masks.to(scores.dtype)).amax(dim=1, keepdim=True)

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
