"""Images without component masks are never routed to component experts, at any ``top_k``."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_masks, tiny_model


@pytest.mark.parametrize("top_k", [4, 5, 6])  # patch + global = 4: at and above it
def test_images_without_masks_skip_component_experts_at_any_top_k(top_k):
    torch.manual_seed(0)
    model = tiny_model(top_k=top_k).eval()
    with torch.no_grad():
        model.gating_network.gate[2].bias[4:] = 100.0  # the gate prefers the component experts
    image = torch.randn(3, 3, 56, 56)
    masks, counts = random_masks(3, 56, [2, 0, 1])  # image 1 has no masks
    with torch.no_grad():
        out = model(image, None, masks, counts)
        train = model.train().forward_train(image, image.clone(), masks, counts)
    weights = out.routing_weights
    assert (weights[1, 4:] == 0).all() and not train.expert_mask[1, 4:].any()
    assert (weights[[0, 2], 4:] > 0).all()
    # Renormalised over the allowed experts: every image's weights sum to one.
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    assert (weights[1] > 0).sum() == min(top_k, 4)
    assert train.expert_mask.sum(1).tolist() == [top_k, min(top_k, 4), top_k]


def test_no_masks_at_all_routes_to_patch_and_global_only():
    torch.manual_seed(0)
    model = tiny_model(top_k=6).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 56, 56))  # no masks given
    assert (out.routing_weights[:, 4:] == 0).all()
    assert out.map_component.abs().sum() == 0
