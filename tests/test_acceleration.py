"""Speed options applied from outside the model: the Lightning module applies them once."""

from __future__ import annotations

import torch

from src.module import AnomalyMoEModule
from tests.conftest import tiny_model


def test_module_applies_channels_last_and_compile_once_in_configure_model():
    module = AnomalyMoEModule(tiny_model(), channels_last=True, compile_experts=True, compile_backend="eager")
    weight = module.net.global_experts[0].student[0].weight
    assert not weight.is_contiguous(memory_format=torch.channels_last), "nothing happens before configure_model"
    keys = list(module.state_dict())
    module.configure_model()
    module.configure_model()  # Lightning calls it before fit and again before test
    weight = module.net.global_experts[0].student[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert len(module.net.global_experts[0]._forward_pre_hooks) == 1
    assert all(e._compiled_call_impl is not None for e in [*module.net.patch_experts, *module.net.global_experts])
    assert list(module.state_dict()) == keys, "checkpoint keys do not change"


def test_module_without_speed_options_leaves_the_model_alone():
    module = AnomalyMoEModule(tiny_model())
    module.configure_model()
    assert not module.net.global_experts[0]._forward_pre_hooks
    assert all(e._compiled_call_impl is None for e in module.net.patch_experts)
