"""Frozen DINOv2-with-registers ViT encoder (timm), tokenised exactly like the original.

The original AnomalyMoE code uses Meta's DINOv2 implementation. We host the same network in
timm (identical block parameters) and reproduce the two places where the original differs
from timm's defaults:

* position embeddings are resized on every call with DINOv2's *offset rule* (SPEC 2.3):
  ``F.interpolate(scale_factor=(h + 0.1) / M, mode="bicubic", antialias=False)`` on the
  stored M x M grid, instead of timm's size-based, antialiased resample;
* blocks are tapped directly and the final LayerNorm is never applied (SPEC 2.4, 2.5).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.weight_formats import load_backbone_file

log = logging.getLogger(__name__)

# Names accepted for `weights` besides a file path.
WEIGHTS_HUB = "hub"  # timm / Hugging Face hub download of the pretrained DINOv2 weights
WEIGHTS_RANDOM = "random"  # explicit choice: random init, logged loudly
WEIGHTS_DEFERRED = "from_checkpoint"  # a full model checkpoint will fill the encoder

DINOV2_DOWNLOADS = {
    "vit_small_patch14_reg4_dinov2": "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "vit_base_patch14_reg4_dinov2": "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
    "vit_large_patch14_reg4_dinov2": "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
    "vit_giant_patch14_reg4_dinov2": "dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth",
}


@dataclass
class EncoderOutput:
    taps: list[Tensor]  # one (B, N, C) tensor per tapped block, all N = 1 + R + h*w tokens
    cls: Tensor  # (B_cls, C) CLS token after the last block, without the final norm
    grid: tuple[int, int]  # (h, w) patch grid


def interpolate_pos_embed_offset(pos_embed: Tensor, h: int, w: int, offset: float = 0.1) -> Tensor:
    """Resize a (1, M*M, C) patch position table to (1, h*w, C) with DINOv2's offset rule.

    An explicit scale factor (h + offset) / M is passed to bicubic interpolation, so PyTorch
    maps output pixel i to source coordinate (i + 0.5) * M / (h + offset) - 0.5 (SPEC 2.3).
    """
    n, c = pos_embed.shape[1], pos_embed.shape[2]
    m = math.isqrt(n)
    assert m * m == n, f"position table of {n} entries is not a square grid"
    if h == m and w == m:
        return pos_embed
    grid = pos_embed.float().reshape(1, m, m, c).permute(0, 3, 1, 2)  # (1, C, M, M)
    grid = F.interpolate(
        grid,
        scale_factor=((h + offset) / m, (w + offset) / m),
        mode="bicubic",
        antialias=False,
    )
    assert grid.shape[-2:] == (h, w), f"offset interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}"
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, c).to(pos_embed.dtype)


class DinoV2Backbone(nn.Module):
    """Frozen DINOv2 ViT with 4 registers; returns tapped block outputs and the last CLS token.

    Args:
        name: timm architecture, e.g. ``vit_base_patch14_reg4_dinov2`` (S/B/L/G variants).
        weights: ``"hub"`` (download through timm), a path to a Meta ``.pth`` or timm
            checkpoint, ``"random"`` (explicit random init, logged as a warning) or
            ``"from_checkpoint"`` (a full AnomalyMoE checkpoint loaded later fills it).
        arch_overrides: keyword arguments passed to ``timm.create_model`` to change the
            architecture (``embed_dim``, ``num_heads``, ``depth``...). Used for tiny test models.
        pos_grid: side of the stored position table (37 for DINOv2, i.e. 518 px / 14).
        interpolate_offset: DINOv2's offset added to the target grid when resizing positions.
    """

    def __init__(
        self,
        name: str = "vit_base_patch14_reg4_dinov2",
        weights: str = WEIGHTS_HUB,
        arch_overrides: dict | None = None,
        pos_grid: int = 37,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        overrides = dict(arch_overrides or {})
        patch = 14
        self.vit = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            img_size=pos_grid * patch,
            **overrides,
        )
        self.patch_size = self.vit.patch_embed.patch_size[0]
        assert self.vit.no_embed_class, f"{name}: expected a DINOv2-style model (no_embed_class=True)"
        self.num_registers = self.vit.num_reg_tokens
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.embed_dim = self.vit.embed_dim
        self.depth = len(self.vit.blocks)
        self.interpolate_offset = interpolate_offset
        self.name = name
        self.arch_overrides = overrides
        self._load_weights(weights)
        self.requires_grad_(False)
        self.eval()

    @property
    def architecture(self) -> str:
        """The encoder as built, e.g. "ViT of 12 blocks, 64 dims, 2 heads, ..." (``arch_overrides``
        change timm's architecture of ``name``, so the name alone may not describe it)."""
        return (f"ViT of {self.depth} blocks, {self.embed_dim} dims, {self.vit.blocks[0].attn.num_heads} heads, "
                f"{self.patch_size} px patches, {self.num_registers} registers, positions for "
                f"{self.vit.patch_embed.img_size[0]} px")

    def _origin(self) -> str:
        return f"timm's {self.name}" + (" changed by model.backbone.arch_overrides" if self.arch_overrides else "")

    # ------------------------------------------------------------------ weights
    def _load_weights(self, weights: str) -> None:
        if weights == WEIGHTS_DEFERRED:
            log.info("Backbone (%s, %s): weights will come from the model checkpoint.", self.architecture,
                     self._origin())
            return
        if weights == WEIGHTS_RANDOM:
            advice = (f"pretrained DINOv2 weights (model.backbone.weights=hub or a checkpoint path) fit {self.name} "
                      "without arch_overrides" if self.arch_overrides else
                      "set model.backbone.weights=hub or a path to a DINOv2 checkpoint")
            log.warning("Backbone (%s, %s) uses RANDOM weights (model.backbone.weights=random). Its features are "
                        "not pretrained, so anomaly detection on real data will be poor; %s.", self.architecture,
                        self._origin(), advice)
            return
        if weights == WEIGHTS_HUB:
            self._load_from_hub()
            return
        load_backbone_file(self.vit, Path(os.path.expanduser(str(weights))))
        log.info("Backbone %s: loaded weights from %s", self.name, weights)

    def _load_from_hub(self) -> None:
        try:
            pretrained = timm.create_model(self.name, pretrained=True, num_classes=0, img_size=self.vit.patch_embed.img_size)
        except Exception as err:  # network, hub or cache errors all end here
            url = DINOV2_DOWNLOADS.get(self.name)
            hint = f" Download https://dl.fbaipublicfiles.com/dinov2/{url} and set model.backbone.weights=<path>." if url else ""
            raise RuntimeError(
                f"Could not get pretrained weights for {self.name} from the Hugging Face hub "
                f"({type(err).__name__}: {err}).{hint} To train on random features instead, set "
                "model.backbone.weights=random explicitly."
            ) from err
        self.vit.load_state_dict(pretrained.state_dict(), strict=True)
        log.info("Backbone %s: loaded pretrained weights from the hub.", self.name)

    def train(self, mode: bool = True) -> DinoV2Backbone:
        # The encoder is frozen and always runs in eval mode, whatever the parent does.
        return super().train(False)

    # ------------------------------------------------------------------ forward
    def prepare_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, 3, H, W) images -> (B, 1 + R + h*w, C) tokens [CLS, registers, patches]."""
        vit = self.vit
        x = vit.patch_embed.proj(images)  # (B, C, h, w)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major patches
        x = x + interpolate_pos_embed_offset(vit.pos_embed, h, w, self.interpolate_offset)
        # timm folds the CLS position embedding into cls_token; registers carry none.
        prefix = [vit.cls_token.expand(b, -1, -1), vit.reg_token.expand(b, -1, -1)]
        return torch.cat([*prefix, x], dim=1), (h, w)

    def forward(self, images: Tensor, taps: list[int], cls_batch: int | None = None) -> EncoderOutput:
        """Run the blocks, keeping the outputs of ``taps`` and the final CLS token.

        ``cls_batch``: only the first ``cls_batch`` images need the CLS token of the last
        block; the others stop after the deepest tapped block (saves the tail of the pass).
        """
        assert max(taps) < self.depth, f"tapped block {max(taps)} but the encoder has {self.depth} blocks"
        x, grid = self.prepare_tokens(images)
        cls_batch = x.shape[0] if cls_batch is None else cls_batch
        last_tap = max(taps)
        outputs = {}
        for i, block in enumerate(self.vit.blocks):
            if i == last_tap + 1:
                x = x[:cls_batch]
            x = block(x)
            if i in taps:
                outputs[i] = x
        return EncoderOutput(taps=[outputs[i] for i in taps], cls=x[:cls_batch, 0], grid=grid)
