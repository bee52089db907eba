"""Dense features that part prototypes are fitted on: the frozen backbone or plain colours."""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from data_modules.types import IMAGENET_MEAN, IMAGENET_STD
from src.models.backbone import DinoV2Backbone


class DenseFeatures(Protocol):
    normalize: bool  # True: compare by cosine (features are L2-normalised before k-means)

    def __call__(self, image: Tensor) -> Tensor:
        """(3, H, W) image in [0, 1] -> (C, h, w) features on a grid covering the image."""

    def describe(self) -> dict:
        """What identifies these features in the cache manifest."""


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha1 of a module's parameters and buffers: identifies the weights, random ones included."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class BackboneFeatures:
    """Patch tokens of the frozen DINOv2 backbone, averaged over ``blocks`` (the model's
    component features are the mean of its tapped blocks, SPEC 5.2).

    The image is resized to the nearest multiple of the patch size, so the token grid covers it.
    """

    normalize = True

    def __init__(self, backbone: DinoV2Backbone, blocks: list[int], device: str = "cpu") -> None:
        if not blocks or max(blocks) >= backbone.depth:
            raise ValueError(f"segment.blocks={blocks}: choose blocks in 0..{backbone.depth - 1}")
        self.backbone = backbone.to(device).eval()
        self.blocks = sorted(int(b) for b in blocks)
        self.device = device
        self._fingerprint = state_fingerprint(backbone)

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        return backbone_grid(self.backbone, self.blocks, image[None].to(self.device))[0].float().cpu()  # (C, gh, gw)

    def describe(self) -> dict:
        return {"kind": "backbone", "name": self.backbone.name, "blocks": self.blocks, "weights_sha1": self._fingerprint}


def backbone_grid(backbone: DinoV2Backbone, blocks: list[int], images: Tensor) -> Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, C, gh, gw): the mean of the ``blocks``' patch tokens,
    the image resized (bilinear) to the nearest multiple of the patch size."""
    patch = backbone.patch_size
    h, w = (max(patch, round(s / patch) * patch) for s in images.shape[-2:])
    x = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    out = backbone((x - mean) / std, taps=blocks, cls_batch=0)
    tokens = torch.stack(out.taps).mean(0)[:, backbone.num_prefix_tokens :]  # (B, h*w, C)
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, *out.grid)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(..., 3, H, W) sRGB in [0, 1] -> CIE Lab (D65): L in [0, 100], a and b roughly in [-110, 110]."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    white = torch.tensor([0.950456, 1.0, 1.088754])
    xyz = torch.einsum("ij,...jhw->...ihw", m.to(rgb), linear) / white.to(rgb)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def color_grid(images: Tensor, space: str, stride: int) -> Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, 3, ceil(H / stride), ceil(W / stride)) mean colours
    (Lab, or RGB times 100) of ``stride`` x ``stride`` cells (the last cells may be cut by the border)."""
    colours = rgb_to_lab(images.float()) if space == "lab" else images.float() * 100
    return F.avg_pool2d(colours, stride, ceil_mode=True)


class ColorFeatures:
    """Mean colour of ``stride`` x ``stride`` cells, in CIE Lab (perceptual distances) or RGB.

    No learned weights: parts that differ in colour separate whatever the backbone; parts that
    share a colour do not.
    """

    normalize = False

    def __init__(self, space: str = "lab", stride: int = 4) -> None:
        if space not in ("lab", "rgb"):
            raise ValueError(f"segment.color_space={space!r}; choose lab or rgb")
        if stride < 1:
            raise ValueError(f"segment.color_stride={stride}; use 1 or more pixels")
        self.space, self.stride = space, stride

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        return color_grid(image[None], self.space, self.stride)[0]

    def describe(self) -> dict:
        return {"kind": "color", "space": self.space, "stride": self.stride}
