"""The three expert families and the gate of AnomalyMoE (SPEC sections 3-6).

Module and attribute names follow the original so that its state dict maps one to one
(``patch_experts.{i}.bottleneck.0.fc1.weight``, ``global_experts.{j}.autoencoder.8.weight``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn


# --------------------------------------------------------------------------- patch experts
class LinearAttention(nn.Module):
    """Kernelised linear attention with phi(t) = elu(t) + 1 (SPEC 3.2, "LinearAttention2").

    out_s = phi(q_s)^T (sum_t phi(k_t) v_t^T) / (phi(q_s)^T sum_t phi(k_t)); no scaling, no eps.
    Cost is linear in the number of tokens.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]  # (B, heads, N, d)
        kv = torch.einsum("bhsd,bhse->bhde", k, v)  # (B, heads, d, d)
        norm = torch.einsum("bhsd,bhd->bhs", q, k.sum(dim=2))  # (B, heads, N)
        out = torch.einsum("bhsd,bhde->bhse", q, kv) / norm.unsqueeze(-1)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block with linear attention; LayerNorm eps 1e-8, no LayerScale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Bottleneck(nn.Module):
    """Dinomaly's noisy bottleneck: dropout on input, hidden and output of a 2-layer MLP."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.fc1(self.drop(x)))
        return self.drop(self.fc2(self.drop(x)))


class PatchExpert(nn.Module):
    """Bottleneck MLP + ``depth`` linear-attention blocks reconstructing encoder tokens (SPEC 3)."""

    def __init__(self, dim: int, num_heads: int, depth: int = 8, mlp_ratio: float = 4.0, drop: float = 0.2) -> None:
        super().__init__()
        self.bottleneck = nn.ModuleList([Bottleneck(dim, int(dim * mlp_ratio), drop)])
        self.decoder = nn.ModuleList([DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])

    def forward(self, tokens: Tensor) -> list[Tensor]:
        """(n, N, C) fused encoder tokens -> decoder block outputs, deepest first (``de[m] = d_{depth-1-m}``)."""
        x = self.bottleneck[0](tokens)
        outputs = []
        for block in self.decoder:
            x = block(x)
            outputs.append(x)
        return outputs[::-1]


# --------------------------------------------------------------------------- global experts
class GlobalAutoencoder(nn.Sequential):
    """EfficientAD-style convolutional autoencoder (SPEC 4.1), indices as in the original.

    The encoder squeezes the image to a small code with two 9x9 stride-7 convolutions, the
    decoder grows it back through fixed sizes. Two changes make it work for any input size and
    are identities at 392 px: the last upsampling goes to the token grid (28 at 392 px), and
    a feature map smaller than a 9x9 kernel is zero-padded up to it (only below 392 px).
    """

    DECODER_SIZES = (3, 7, 15, 31, 63, 31)

    def __init__(self, out_channels: int, channels: int = 32, drop: float = 0.2) -> None:
        c1, c2, c3 = channels, 2 * channels, 4 * channels
        layers: list[nn.Module] = [
            nn.Conv2d(3, c1, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c2, c3, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c3, c3, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c3, c3, 9, 7, 1), nn.ReLU(),
            nn.Conv2d(c3, c3, 9, 7, 1),
        ]  # fmt: skip
        for size in self.DECODER_SIZES:
            layers += [nn.Upsample(size=size, mode="bilinear"), nn.Conv2d(c3, c3, 4, 1, 2), nn.ReLU(), nn.Dropout(drop)]
        layers += [
            nn.Upsample(size=28, mode="bilinear"),  # resized to the token grid in forward()
            nn.Conv2d(c3, c3, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c3, out_channels, 3, 1, 1),
        ]  # fmt: skip
        super().__init__(*layers)
        self._last_upsample = len(layers) - 4

    def forward(self, image: Tensor, grid: tuple[int, int]) -> Tensor:  # type: ignore[override]
        """(n, 3, H, W) -> (n, C, h, w) with (h, w) the token grid."""
        x = image
        for idx, layer in enumerate(self):
            if isinstance(layer, nn.Conv2d) and layer.kernel_size[0] > 2 * layer.padding[0] + 1:
                x = _pad_to_kernel(x, layer)
            if idx == self._last_upsample:
                x = F.interpolate(x, size=grid, mode="bilinear")
            else:
                x = layer(x)
        return x


def _pad_to_kernel(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Zero-pad (symmetrically) a map too small for ``conv``'s kernel; a no-op otherwise."""
    need_h = conv.kernel_size[0] - 2 * conv.padding[0] - x.shape[-2]
    need_w = conv.kernel_size[1] - 2 * conv.padding[1] - x.shape[-1]
    if need_h <= 0 and need_w <= 0:
        return x
    ph, pw = max(need_h, 0), max(need_w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class Student(nn.Sequential):
    """Convolutional "student" mapping the image to the token grid (SPEC 4.2); stride 2 * 7 = 14.

    Its two first stages (3x3 convolution, ReLU, average pooling) hold the largest activations
    of the model: 256 and 512 channels at full and half image resolution. Without gradients,
    ``strip_rows > 0`` computes them in horizontal strips of ``strip_rows`` token-grid rows
    (``14 * strip_rows`` image rows) and keeps only the pooled result, which is the same
    computation on the same inputs (each output pixel sees the same zero-padded window), with a
    fraction of the peak memory. ``strip_rows=0`` runs each stage on the whole image, like the
    original.
    """

    def __init__(self, out_channels: int, channels: tuple[int, int] = (256, 512)) -> None:
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(3, c1, 3, 1, 1), nn.ReLU(),
            nn.AvgPool2d(2, 2),
            nn.Conv2d(c1, c2, 3, 1, 1), nn.ReLU(),
            nn.AvgPool2d(7, 7),
            nn.Conv2d(c2, c2, 1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c2, out_channels, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 1),
        )  # fmt: skip

    def forward(self, image: Tensor, strip_rows: int = 0) -> Tensor:  # type: ignore[override]
        if strip_rows <= 0 or torch.is_grad_enabled():
            return super().forward(image)
        x = _strip_conv_relu_pool(image, self[0], 2, 14 * strip_rows)
        x = _strip_conv_relu_pool(x, self[3], 7, 7 * strip_rows)
        for layer in list(self)[6:]:
            x = layer(x)
        return x


def _strip_conv_relu_pool(x: Tensor, conv: nn.Conv2d, pool: int, rows: int) -> Tensor:
    """``avg_pool(relu(conv(x)), pool)`` for a 3x3, stride-1, padding-1 ``conv``, computed over
    strips of ``rows`` output rows (a multiple of ``pool``) so that only one strip of the
    full-resolution activation exists at a time."""
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    height = x.shape[-2]
    if rows >= height:
        return F.avg_pool2d(F.relu(conv(x)), pool)
    padded = F.pad(x, (0, 0, 1, 1))  # rows only; columns keep the convolution's own padding
    strips = []
    for top in range(0, height - height % pool, rows):
        bottom = min(top + rows, height - height % pool)
        out = F.conv2d(padded[..., top : bottom + 2, :], conv.weight, conv.bias, padding=(0, 1))
        strips.append(F.avg_pool2d(out.relu_(), pool))
    return torch.cat(strips, dim=-2)


class GlobalExpert(nn.Module):
    """Autoencoder + student pair reading the (colour-jittered) image (SPEC 4)."""

    def __init__(
        self,
        out_channels: int,
        ae_channels: int = 32,
        student_channels=(256, 512),
        drop: float = 0.2,
        strip_rows: int = 0,
    ) -> None:
        super().__init__()
        self.autoencoder = GlobalAutoencoder(out_channels, ae_channels, drop)
        self.student = Student(out_channels, tuple(student_channels))
        self.strip_rows = strip_rows

    def forward(self, image: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(n, 3, H, W) -> autoencoder and student maps, each (n, C, h, w)."""
        ae = self.autoencoder(image, grid)
        student = self.student(image, self.strip_rows)
        assert student.shape[-2:] == ae.shape[-2:], (
            f"student grid {tuple(student.shape[-2:])} != token grid {grid}; the image side must be a multiple of 14"
        )
        return ae, student


# --------------------------------------------------------------------------- component experts
class ComponentExpert(nn.Module):
    """MLP autoencoder on mask-pooled component vectors (SPEC 5.1)."""

    def __init__(self, dim: int, hidden: tuple[int, int] = (256, 64), drop: float = 0.1) -> None:
        super().__init__()
        h1, h2 = hidden
        self.encoder = nn.Sequential(nn.Linear(dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, h2))
        self.decoder = nn.Sequential(
            nn.Dropout(drop), nn.Linear(h2, h2), nn.ReLU(),
            nn.Dropout(drop), nn.Linear(h2, h1), nn.ReLU(),
            nn.Dropout(drop), nn.Linear(h1, dim),
        )  # fmt: skip

    def forward(self, features: Tensor) -> Tensor:
        """(n, C) -> (n, C) reconstruction."""
        return self.decoder(self.encoder(features))


def legacy_nearest_index(in_size: int, out_size: int, device=None) -> Tensor:
    """(out_size,) source pixel of each output pixel of ``F.interpolate(mode="nearest")`` when
    downsampling: floor(i * in / out) in float32, as its CPU kernel."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    return (torch.arange(out_size, dtype=torch.float32) * scale).floor().long().clamp_max(in_size - 1).to(device)


def pool_component_slots(feature_map: Tensor, masks: Tensor, dilation: int = 5) -> Tensor:
    """(B, C, h, w) features and (B, K, H, W) masks -> (B, K, C) mean feature inside each dilated
    mask, padding slots included (an empty mask gives a zero vector)."""
    # Legacy nearest picks the top-left pixel of each patch, as the original does (by indexing:
    # the ONNX export translates this resize with other source pixels).
    rows, cols = (legacy_nearest_index(n, m, masks.device) for n, m in zip(masks.shape[-2:], feature_map.shape[-2:]))
    small = masks[:, :, rows][:, :, :, cols].float()  # (B, K, h, w)
    if dilation > 1:
        small = F.max_pool2d(small, dilation, stride=1, padding=dilation // 2)
    return torch.einsum("bkhw,bchw->bkc", small, feature_map) / (small.sum((2, 3)).unsqueeze(-1) + 1e-8)


def pool_component_features(
    feature_map: Tensor, masks: Tensor, num_masks: Tensor, dilation: int = 5
) -> tuple[Tensor, Tensor]:
    """Average features inside each (dilated) component mask (SPEC 5.2).

    Args:
        feature_map: (B, C, h, w) encoder features.
        masks: (B, K, H, W) binary masks at image resolution, padded with empty masks.
        num_masks: (B,) number of real masks per image.
    Returns:
        (M, C) component vectors, image by image, and (M,) the image index of each.
    """
    b, k = masks.shape[:2]
    if k == 0:
        return feature_map.new_zeros(0, feature_map.shape[1]), num_masks.new_zeros(0)
    pooled = pool_component_slots(feature_map, masks, dilation)  # (B, K, C)
    valid = torch.arange(k, device=masks.device).unsqueeze(0) < num_masks.unsqueeze(1)  # (B, K)
    image_index = torch.arange(b, device=masks.device).unsqueeze(1).expand(b, k)
    return pooled[valid], image_index[valid]


# --------------------------------------------------------------------------- gate
class GatingNetwork(nn.Module):
    """Two-layer MLP from the CLS token to one logit per expert (SPEC 6)."""

    def __init__(self, dim: int, num_experts: int, hidden: int = 256) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, cls: Tensor) -> Tensor:
        return self.gate(cls)  # (B, E) raw logits


def top_k_routing(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax over the k largest logits, scattered back: (B, E) weights and (B, E) bool mask."""
    top_values, top_index = torch.topk(logits, k, dim=1)
    weights = torch.zeros_like(logits).scatter(1, top_index, torch.softmax(top_values, dim=1))
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_index, True)
    return weights, mask
