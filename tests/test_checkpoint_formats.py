"""Meta's DINOv2 ``.pth`` format, converted by timm's own DINOv2 filter plus what it lacks."""

from __future__ import annotations

import pytest
import torch

from src.models.backbone import DinoV2Backbone
from src.models.weight_formats import CheckpointError, meta_dinov2_to_timm
from tests.conftest import tiny_backbone

DIM, HEADS, DEPTH, GRID = 32, 2, 12, 37  # the tiny backbone of the tests (conftest.tiny_backbone)


def meta_state(dim: int = DIM, depth: int = DEPTH, grid: int = GRID, chunks: int = 0, dtype=torch.float32) -> dict:
    """Random weights under the key names of Meta's ``dinov2_vit*14_reg4_pretrain.pth`` (written out
    here, independent of the conversion under test); ``chunks``: Meta's chunked blocks ``blocks.c.i``."""
    shapes = {
        "cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "register_tokens": (1, 4, dim),
        "mask_token": (1, dim), "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    for i in range(depth):
        block = f"blocks.{i // (depth // chunks)}.{i}." if chunks else f"blocks.{i}."
        shapes.update({block + k: s for k, s in {
            "norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "ls1.gamma": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,), "ls2.gamma": (dim,),
        }.items()})
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn(s, generator=g) * 0.2).to(dtype) for k, s in shapes.items()}


def test_meta_keys_become_the_timm_model_keys():
    meta = meta_state()
    before = {k: v.clone() for k, v in meta.items()}
    timm_state = meta_dinov2_to_timm(meta)
    vit = tiny_backbone(DIM, HEADS).vit.state_dict()
    assert {k: tuple(v.shape) for k, v in timm_state.items()} == {k: tuple(v.shape) for k, v in vit.items()}
    # the CLS position is folded into the CLS token; registers carry no position; mask_token is dropped
    torch.testing.assert_close(timm_state["cls_token"], meta["cls_token"] + meta["pos_embed"][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(timm_state["pos_embed"], meta["pos_embed"][:, 1:], rtol=0, atol=0)
    assert timm_state["reg_token"] is meta["register_tokens"]
    assert set(meta) == set(before) and all(torch.equal(meta[k], before[k]) for k in meta)  # input untouched


def test_meta_pth_loads_into_the_backbone(tmp_path):
    meta = meta_state()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta, path)
    loaded = DinoV2Backbone(weights=str(path), arch_overrides={"embed_dim": DIM, "num_heads": HEADS}).vit.state_dict()
    assert torch.equal(loaded["blocks.11.mlp.fc2.weight"], meta["blocks.11.mlp.fc2.weight"])
    assert torch.equal(loaded["reg_token"], meta["register_tokens"])


def test_chunked_blocks_and_fp16_checkpoints():
    flat = meta_dinov2_to_timm(meta_state())
    chunked = meta_dinov2_to_timm(meta_state(chunks=4))  # blocks.0.0 .. blocks.3.11
    assert flat.keys() == chunked.keys() and all(torch.equal(flat[k], chunked[k]) for k in flat)
    half = meta_state(dtype=torch.float16)
    folded = meta_dinov2_to_timm(half)["cls_token"]
    assert torch.equal(folded, half["cls_token"].float() + half["pos_embed"][:, :1].float())  # summed in fp32


def test_swiglu_layers_are_renamed_by_timm():
    meta = meta_state(depth=1)
    meta = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in meta.items()}  # ViT-g
    keys = set(meta_dinov2_to_timm(meta))
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"} <= keys and not any(".w12." in k for k in keys)


def test_a_position_table_of_another_size_is_an_error_not_resampled(tmp_path):
    path = tmp_path / "grid16.pth"
    torch.save(meta_state(grid=16), path)
    with pytest.raises(CheckpointError, match=r"wrong shape keys: pos_embed: checkpoint \(1, 256, 32\) vs model \(1, 1369, 32\)"):
        DinoV2Backbone(weights=str(path), arch_overrides={"embed_dim": DIM, "num_heads": HEADS})
