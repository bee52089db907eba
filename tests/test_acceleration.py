"""Speed options applied from outside the model: the Lightning module applies them once."""

from __future__ import annotations

import pytest
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


def test_inference_and_training_under_bf16_autocast(seeded):
    """bf16 autocast (trainer.precision=bf16-mixed, benchmark.precision=bf16): float32 maps close to fp32's."""
    from tests.conftest import random_masks

    model = tiny_model(top_k=3).eval()
    image = torch.randn(3, 3, 56, 56)
    masks, counts = random_masks(3, 56, [2, 0, 1])
    with torch.no_grad():
        expected = model(image, None, masks, counts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(image, None, masks, counts)
    for name in ("map_patch", "map_global", "map_component"):
        value = getattr(got, name)
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        torch.testing.assert_close(value, getattr(expected, name), atol=0.05, rtol=0.1, msg=name)
    module = AnomalyMoEModule(model.train())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = module.objective(model.forward_train(image, None, masks, counts))
    assert torch.isfinite(terms.loss) and torch.isfinite(terms.estimator)


@pytest.mark.slow
def test_experts_compiled_by_inductor_give_eager_maps(seeded):
    """module.compile_experts=true with the default backend (inductor, C++ on the CPU): the same maps
    up to float32 rounding of the map's scale (inductor reorders sums)."""
    import copy

    from src.models.acceleration import accelerate
    from tests.conftest import random_masks

    eager = tiny_model(top_k=2).eval()
    compiled = accelerate(copy.deepcopy(eager), compile_experts=True)
    image = torch.rand(3, 3, 56, 56)
    masks, counts = random_masks(3, 56, [2, 0, 1])
    with torch.no_grad():
        expected, got = eager(image, None, masks, counts), compiled(image, None, masks, counts)
        again = compiled(image[:2], None, masks[:2], counts[:2])  # another batch size: dynamic shapes
    for name in ("map_patch", "map_global", "map_component"):
        scale = getattr(expected, name).abs().max().item() + 1e-6
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5 * scale, rtol=1e-5, msg=name)
    assert again.map_patch.shape[0] == 2
