"""What a run prints: Lightning's lines once and without its product tips, the parameters per
part of the model (Lightning's summary would show a FLOPs count of 0), the backbone named by what
it is. The whole console of a demo run: ``tests/test_run.py::test_demo_train_test_and_original_checkpoint``."""

from __future__ import annotations

import logging
from functools import partial

import torch
from lightning import Trainer
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from callbacks.parameter_summary import parameter_table
from src.console import quiet_lightning
from src.module import AnomalyMoEModule
from src.optim import StableAdamW
from tests.conftest import tiny_backbone, tiny_model


def test_lightning_lines_come_once_and_without_product_tips(caplog):
    quiet_lightning()
    own = [h for name in ("lightning", "lightning.pytorch", "lightning.fabric")
           for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler]
    assert not own, "Lightning's own console handlers print every line a second time"
    with caplog.at_level(logging.INFO):
        Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    assert "GPU available: False, used: False" in caplog.text
    assert "Tip" not in caplog.text and "litlogger" not in caplog.text and "TPU available" not in caplog.text


def test_parameter_table_lists_the_parts_with_parameters():
    module = AnomalyMoEModule(tiny_model(), optimizer=partial(StableAdamW, lr=5e-4),
                              estimator_optimizer=partial(torch.optim.Adam, lr=5e-4))
    table = parameter_table(module)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert list(rows) == ["net.encoder", "net.patch_experts", "net.global_experts", "net.component_experts",
                          "net.gating_network", "estimator", "**total**"]  # the evaluators have no parameters
    assert rows["net.encoder"].startswith("| net.encoder | ViT of 12 blocks, 32 dims, 2 heads") \
        and rows["net.encoder"].endswith("| frozen |")
    assert "| 2 x PatchExpert |" in rows["net.patch_experts"]
    total = get_human_readable_count(sum(p.numel() for p in module.parameters())).strip()
    trained = get_human_readable_count(sum(p.numel() for p in module.parameters() if p.requires_grad)).strip()
    assert rows["**total**"] == f"| **total** | | {total} | {trained} |"  # the estimator counted once


def test_random_weights_warning_names_the_architecture_built(caplog):
    with caplog.at_level(logging.WARNING):
        tiny_backbone(embed_dim=32, num_heads=2)
    assert "Backbone (ViT of 12 blocks, 32 dims, 2 heads, 14 px patches, 4 registers, positions for 518 px, " \
           "timm's vit_base_patch14_reg4_dinov2 changed by model.backbone.arch_overrides) uses RANDOM" in caplog.text
    assert "fit vit_base_patch14_reg4_dinov2 without arch_overrides" in caplog.text  # hub weights don't fit this one
