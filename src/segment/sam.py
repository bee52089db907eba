"""Route ``sam``: Segment Anything proposals matched across a class's images into part slots.

SAM's automatic mask generator proposes masks for each image. Each proposal gets the mean
feature (backbone tokens, or colours) under it; k-means on the proposals of the training images
gives k part prototypes per class, and every proposal of every image joins the slot of its
nearest prototype. A slot's mask is the union of its proposals, so slot j is the same kind of
part in every image of the class (as the component experts expect).
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from src.models.weight_formats import load_file
from src.segment.features import DenseFeatures, state_fingerprint
from src.segment.parts import Prototypes, fit_prototypes

log = logging.getLogger(__name__)

PROPOSAL_MEMO_BYTES = 1 << 30  # training images' proposals kept between fitting and segmenting
SAM_CHECKPOINTS = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
SAM_PRESETS = {  # segment_anything.build_sam's three sizes
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
SAM_DEFAULTS = dict(image_size=1024, prompt_embed_dim=256, window_size=14)


def build_sam(model_type: str = "vit_b", arch: dict | None = None):
    """A SAM network (random weights) of ``model_type``, with ``arch`` overriding its sizes
    (``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes``, ``image_size``,
    ``prompt_embed_dim``, ``window_size``). Same layout as ``segment_anything.build_sam``."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if model_type not in SAM_PRESETS:
        raise ValueError(f"segment.sam_model_type={model_type!r}; choose one of {sorted(SAM_PRESETS)}")
    a = {**SAM_DEFAULTS, **SAM_PRESETS[model_type], **(arch or {})}
    unknown = set(a) - set(SAM_DEFAULTS) - set(SAM_PRESETS["vit_b"])
    if unknown:
        raise ValueError(f"segment.sam_arch has unknown keys {sorted(unknown)}")
    dim, size, patch = a["prompt_embed_dim"], a["image_size"], 16
    if dim % 16:
        raise ValueError(f"segment.sam_arch.prompt_embed_dim={dim}: use a multiple of 16")
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=a["depth"], embed_dim=a["embed_dim"], img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a["num_heads"], patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(a["global_attn_indexes"]),
            window_size=a["window_size"], out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=8 * dim, num_heads=8),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def load_sam(checkpoint: str | None, model_type: str = "vit_b", arch: dict | None = None, device: str = "cpu"):
    """SAM with the weights of a user-supplied ``checkpoint``; every key must match."""
    if not checkpoint:
        raise ValueError(f"segment=sam needs segment.sam_checkpoint=<file>: download a {model_type} checkpoint "
                         f"from {SAM_CHECKPOINTS}")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"segment.sam_checkpoint={path} does not exist: download a {model_type} checkpoint "
                                f"from {SAM_CHECKPOINTS}")
    state = load_file(path, "segment.sam_checkpoint")  # before building: a refused file costs nothing
    sam = build_sam(model_type, arch)
    state = state.get("model", state) if isinstance(state, dict) else state
    expected = sam.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"segment.sam_checkpoint={path} does not fit a {model_type} SAM (segment.sam_model_type, segment.sam_arch): "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(shapes)} of another shape {shapes[:3]}"
        )
    sam.load_state_dict(state, strict=True)
    return sam.to(device)


class SamSegmenter:
    """Args:
        sam: a loaded SAM network.
        features: what proposals are compared by (their mean feature).
        points_per_side ... box_nms_thresh: ``SamAutomaticMaskGenerator`` settings.
        min_mask_area: proposals under this share of the image are ignored.
    """

    route = "sam"

    def __init__(self, sam, features: DenseFeatures, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95, box_nms_thresh: float = 0.7,
                 min_mask_area: float = 0.001, seed: int = 0) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.settings = dict(points_per_side=points_per_side, points_per_batch=points_per_batch,
                             pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                             box_nms_thresh=box_nms_thresh)
        self.generator = SamAutomaticMaskGenerator(sam, **self.settings)
        self.features = features
        self.min_mask_area = min_mask_area
        self.seed = seed
        self._sam_fingerprint = state_fingerprint(sam)
        # Training images' proposals from fit(), used once by segment(): image digest -> packed masks, features
        self._memo: dict[str, tuple[np.ndarray, tuple[int, ...], Tensor]] = {}

    def describe(self) -> dict:
        return {"features": self.features.describe(), "sam": {**self.settings, "min_mask_area": self.min_mask_area,
                                                              "weights_sha1": self._sam_fingerprint}, "seed": self.seed}

    def proposals(self, image: Tensor, keep: bool = False) -> tuple[np.ndarray, Tensor]:
        """(n, H, W) bool SAM masks of a (3, H, W) image in [0, 1] and their (n, C) mean features.
        ``keep``: remember them (within a memory budget) for the next call with this image."""
        pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()  # (H, W, 3) uint8
        key = hashlib.sha1(pixels.tobytes()).hexdigest()
        if key in self._memo:
            packed, shape, vectors = self._memo.pop(key)
            return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool), vectors
        h, w = pixels.shape[:2]
        found = [m["segmentation"] for m in self.generator.generate(pixels) if m["area"] >= self.min_mask_area * h * w]
        masks = np.stack(found) if found else np.zeros((0, h, w), bool)
        grid = self.features(image)  # (C, gh, gw)
        weights = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[None], grid.shape[-2:])[0]  # (n, gh, gw)
        vectors = torch.einsum("nhw,chw->nc", weights, grid) / weights.sum((1, 2)).clamp_min(1e-8)[:, None]
        if keep and sum(m[0].nbytes for m in self._memo.values()) < PROPOSAL_MEMO_BYTES:
            self._memo[key] = (np.packbits(masks), masks.shape, vectors)
        return masks, vectors

    def fit(self, images: list[Tensor], k: int) -> Prototypes:
        self._memo = {}
        vectors = [self.proposals(image, keep=True)[1] for image in images]
        total = sum(len(v) for v in vectors)
        if total < k:
            raise ValueError(f"SAM proposed {total} masks on {len(images)} training images, fewer than k={k} parts: "
                             "lower segment.k, segment.pred_iou_thresh or segment.stability_score_thresh, or raise "
                             "segment.points_per_side")
        return fit_prototypes(torch.cat(vectors), k, self.features.normalize, self.seed)

    def segment(self, prototypes: Prototypes, image: Tensor) -> Tensor:
        """(k, H, W) bool slots: the union of the proposals nearest to each prototype."""
        masks, vectors = self.proposals(image)
        k = prototypes.centres.shape[0]
        slots = torch.zeros(k, *image.shape[-2:], dtype=torch.bool)
        if len(masks):
            nearest = prototypes.scores(vectors).argmax(1)  # (n,)
            for mask, slot in zip(torch.from_numpy(masks), nearest.tolist()):
                slots[slot] |= mask
        return slots
