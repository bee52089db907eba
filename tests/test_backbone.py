"""DINOv2 tokens, weight formats and loading rules."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from src.models.backbone import DinoV2Backbone, interpolate_pos_embed_offset
from src.models.weight_formats import (
    CheckpointError,
    meta_dinov2_to_timm,
    original_to_ours,
    ours_to_original,
    timm_to_meta_dinov2,
)
from tests.conftest import tiny_backbone, tiny_model


def meta_reference_tokens(sd: dict, images: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """Block outputs computed straight from a Meta DINOv2 state dict (the original's recipe)."""
    c = sd["cls_token"].shape[-1]
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    b, _, h, w = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    pos = sd["pos_embed"]
    m = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, m, m, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
    x = x + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, c)], 1)
    x = torch.cat([x[:, :1], sd["register_tokens"].expand(b, -1, -1), x[:, 1:]], 1)
    outs = []
    for i in range(sum(1 for k in sd if k.endswith("ls1.gamma"))):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, num_heads, c // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q * (c // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = F.linear((a @ v).transpose(1, 2).reshape(b, -1, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + sd[p + "ls1.gamma"] * y
        y = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2.gamma"] * y
        outs.append(x)
    return outs


def random_meta_state(backbone: DinoV2Backbone) -> dict:
    """A Meta-format state dict with non-trivial values everywhere (incl. the CLS position)."""
    g = torch.Generator().manual_seed(0)
    sd = timm_to_meta_dinov2(backbone.vit.state_dict())
    return {k: torch.randn(v.shape, generator=g) * (0.2 if v.ndim > 1 else 0.5) for k, v in sd.items()}


@pytest.mark.parametrize("size", [112, 140])
def test_tokens_match_the_meta_recipe(size):
    backbone = tiny_backbone()
    meta = random_meta_state(backbone)
    backbone.vit.load_state_dict(meta_dinov2_to_timm(meta))
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = backbone(images, list(range(12)))
    ref = meta_reference_tokens(meta, images, num_heads=2)
    for i in range(12):
        torch.testing.assert_close(ours.taps[i], ref[i], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.cls, ref[-1][:, 0], atol=2e-5, rtol=1e-5)
    assert ours.grid == (size // 14, size // 14)


def test_offset_rule_differs_from_a_size_based_resize():
    table = torch.randn(1, 37 * 37, 8)
    ours = interpolate_pos_embed_offset(table, 28, 28)
    plain = F.interpolate(table.reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(28, 28), mode="bicubic")
    assert ours.shape == (1, 784, 8)
    assert (ours - plain.permute(0, 2, 3, 1).reshape(1, 784, 8)).abs().max() > 1e-3
    assert interpolate_pos_embed_offset(table, 37, 37) is table


def test_cls_batch_truncates_the_tail_only():
    backbone = tiny_backbone()
    images = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        full = backbone(images, [2, 5])
        part = backbone(images, [2, 5], cls_batch=2)
    assert part.cls.shape[0] == 2 and part.taps[0].shape[0] == 4
    torch.testing.assert_close(part.cls, full.cls[:2])
    torch.testing.assert_close(part.taps[1], full.taps[1])


@pytest.mark.parametrize("fmt", ["meta", "timm", "anomalymoe"])
def test_backbone_weights_from_files(tmp_path, fmt):
    source = tiny_backbone()
    meta = random_meta_state(source)
    source.vit.load_state_dict(meta_dinov2_to_timm(meta))
    path = tmp_path / f"weights_{fmt}.pth"
    if fmt == "meta":
        torch.save(meta, path)
    elif fmt == "timm":
        torch.save(source.vit.state_dict(), path)
    else:  # a whole original-format AnomalyMoE checkpoint, DDP prefix included
        model = tiny_model()
        model.encoder.vit.load_state_dict(source.vit.state_dict())
        torch.save({f"module.{k}": v for k, v in ours_to_original(model.state_dict()).items()}, path)
    loaded = DinoV2Backbone(weights=str(path), arch_overrides={"embed_dim": 32, "num_heads": 2})
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, [3]).taps[0], source(images, [3]).taps[0])


def test_mismatched_backbone_file_is_an_error(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(tiny_backbone(embed_dim=64).vit.state_dict(), path)
    with pytest.raises(CheckpointError, match="wrong shape keys: blocks.0.attn.proj.bias"):
        DinoV2Backbone(weights=str(path), arch_overrides={"embed_dim": 32, "num_heads": 2})
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        DinoV2Backbone(weights=str(tmp_path / "nowhere.pth"), arch_overrides={"embed_dim": 32, "num_heads": 2})


def test_hub_failure_says_how_to_get_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="dinov2_vits14_reg4_pretrain.pth.*model.backbone.weights=random"):
        DinoV2Backbone("vit_small_patch14_reg4_dinov2", weights="hub", arch_overrides={"depth": 1})


def test_random_weights_are_announced(caplog):
    with caplog.at_level(logging.WARNING):
        tiny_backbone()
    assert "RANDOM weights" in caplog.text


def test_export_round_trip_keeps_outputs():
    model = tiny_model().eval()
    original = ours_to_original(model.state_dict())
    assert "encoder.register_tokens" in original and "encoder.pos_embed" in original
    assert original["encoder.pos_embed"].shape[1] == 37 * 37 + 1
    again = tiny_model().eval()
    again.load_state_dict(original_to_ours(original))
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(again(images).map_patch, model(images).map_patch)
