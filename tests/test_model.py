"""The torch model: sparse vs dense dispatch, gradients, shapes, building blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.losses import Objective
from src.models.acceleration import accelerate
from src.models.experts import GlobalExpert, LinearAttention, pool_component_features, top_k_routing
from tests.conftest import random_masks, tiny_model


def _losses(model, out):
    """The objective's terms that do not depend on the random EIR pairs."""
    terms = Objective(model.encoder.embed_dim, model.num_experts)(out)
    return {"patch": terms.patch, "global": terms.global_, "component": terms.component, "esb": terms.esb}


@pytest.fixture
def batch():
    torch.manual_seed(1)
    image = torch.randn(5, 3, 84, 84)
    image_ae = image + 0.1 * torch.randn_like(image)
    masks, counts = random_masks(5, 84, [2, 0, 3, 1, 2])
    return image, image_ae, masks, counts


def spread_gate(model, seed: int = 0) -> None:
    """Large gate weights, so that routing differs between images."""
    g = torch.Generator().manual_seed(seed)
    for layer in (model.gating_network.gate[0], model.gating_network.gate[2]):
        layer.weight.data = torch.randn(layer.weight.shape, generator=g) * 3


def test_sparse_and_dense_give_the_same_outputs_and_losses(batch, seeded):
    model = tiny_model(num_patch_experts=3, num_global_experts=3, num_component_experts=3, top_k=3).eval()
    spread_gate(model)
    image, image_ae, masks, counts = batch
    results = {}
    for dispatch in ("sparse", "dense"):
        model.dispatch = dispatch
        with torch.no_grad():
            results[dispatch] = (model(image, image_ae, masks, counts), _losses(model, model.forward_train(image, image_ae, masks, counts)))
    (sparse, sparse_losses), (dense, dense_losses) = results["sparse"], results["dense"]
    selected = sparse.routing_weights > 0
    per_expert = selected.sum(0)
    assert ((per_expert > 0) & (per_expert < 5)).any(), f"routing should differ between images: {selected}"
    assert selected[:, 6:].any(), "some image should use a component expert"
    for name in ("map_patch", "map_global", "map_component", "routing_weights", "group_weights"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), atol=1e-5, rtol=0, msg=name)
    for name in sparse_losses:
        torch.testing.assert_close(sparse_losses[name], dense_losses[name], atol=1e-6, rtol=1e-5, msg=name)
    assert sparse.map_component.abs().sum() > 0


def test_sparse_runs_only_routed_images(batch):
    model = tiny_model(num_patch_experts=3, num_global_experts=3, num_component_experts=3, top_k=2).eval()
    spread_gate(model)
    image, image_ae, masks, counts = batch
    with torch.no_grad():
        out = model.forward_train(image, image_ae, masks, counts)
    assert 0 < out.expert_mask[:, 0].sum() < 5 or 0 < out.expert_mask[:, 1].sum() < 5
    p, g, _ = model.num_experts
    for i, run in enumerate(out.patch):
        rows = out.expert_mask[:, i].nonzero().flatten()
        assert (run is None and rows.numel() == 0) or torch.equal(run.rows, rows)
    for j, run in enumerate(out.global_):
        rows = out.expert_mask[:, p + j].nonzero().flatten()
        assert (run is None and rows.numel() == 0) or torch.equal(run.rows, rows)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_every_trainable_parameter_gets_a_gradient_when_all_experts_are_selected(batch, dispatch):
    model = tiny_model(top_k=6, dispatch=dispatch).train()
    image, image_ae, masks, counts = batch
    out = model.forward_train(image, image_ae, masks, counts)
    losses = _losses(model, out)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(p.grad is None for p in model.encoder.parameters()), "the encoder must stay frozen"


def test_training_mode_uses_dropout_and_eval_is_deterministic(batch):
    model = tiny_model()
    image, image_ae, masks, counts = batch
    model.eval()
    with torch.no_grad():
        a, b = model(image, None, masks, counts), model(image, None, masks, counts)
    torch.testing.assert_close(a.map_patch, b.map_patch, rtol=0, atol=0)
    model.train()
    assert model.encoder.training is False, "the frozen encoder stays in eval mode"


@pytest.mark.parametrize("size", [56, 112, 168, 392])
def test_global_expert_output_follows_the_token_grid(size):
    expert = GlobalExpert(out_channels=16, ae_channels=4, student_channels=(8, 16)).eval()
    grid = (size // 14, size // 14)
    ae, student = expert(torch.randn(1, 3, size, size), grid)
    assert ae.shape == student.shape == (1, 16, *grid)


@pytest.mark.parametrize(("size", "strip_rows"), [(56, 1), (70, 2), (168, 5), (168, 12)])
def test_student_in_strips_equals_whole_image(size, strip_rows):
    """Strip-wise inference of the student's large stages gives the whole-image values, and
    training (with gradients) always runs on whole images."""
    torch.manual_seed(0)
    expert = GlobalExpert(out_channels=16, ae_channels=4, student_channels=(8, 16)).eval()
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        whole = expert.student(image, strip_rows=0)
        strips = expert.student(image, strip_rows=strip_rows)
    assert strips.shape == whole.shape == (2, 16, size // 14, size // 14)
    torch.testing.assert_close(strips, whole, rtol=0, atol=1e-6)
    with torch.enable_grad():
        torch.testing.assert_close(expert.student(image, strip_rows=strip_rows), whole, rtol=0, atol=1e-6)


def test_global_autoencoder_is_unpadded_at_392():
    """At 392 px the autoencoder code is 1x1 as in the original; no padding kicks in."""
    expert = GlobalExpert(out_channels=8, ae_channels=4, student_channels=(8, 8)).eval()
    x = torch.randn(1, 3, 392, 392)
    for idx in range(11):  # encoder part
        x = expert.autoencoder[idx](x)
    assert x.shape[-2:] == (1, 1)


def test_linear_attention_matches_the_formula():
    torch.manual_seed(0)
    attn = LinearAttention(8, 2)
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    out = torch.zeros(2, 2, 5, 4)
    for b in range(2):
        for h in range(2):
            kv = sum(torch.outer(phi(k[b, h, s]), v[b, h, s]) for s in range(5))
            ksum = phi(k[b, h]).sum(0)
            for s in range(5):
                out[b, h, s] = phi(q[b, h, s]) @ kv / (phi(q[b, h, s]) @ ksum)
    expected = attn.proj(out.transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_component_pooling_matches_a_loop():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 4, 4)
    masks, counts = random_masks(2, 56, [2, 1])
    pooled, image_index = pool_component_features(features, masks, counts, dilation=3)
    assert image_index.tolist() == [0, 0, 1]
    expected = []
    for b, n in enumerate(counts.tolist()):
        for m in range(n):
            small = masks[b, m, ::14, ::14].float()  # top-left pixel of each patch
            small = F.max_pool2d(small[None, None], 3, 1, 1)[0, 0]
            expected.append((features[b] * small).sum((1, 2)) / (small.sum() + 1e-8))
    torch.testing.assert_close(pooled, torch.stack(expected))


def test_top_k_routing():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    weights, mask = top_k_routing(logits, 2)
    assert mask.tolist() == [[False, True, True, False], [False, False, True, True]]
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    torch.testing.assert_close(weights[0, 1], torch.sigmoid(torch.tensor(1.0)))


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="model.top_k=7"):
        tiny_model(top_k=7)
    with pytest.raises(ValueError, match="fuse_groups_eval"):
        tiny_model(fuse_groups_eval=[[0, 8]])
    with pytest.raises(ValueError, match="model.dispatch"):
        tiny_model(dispatch="fast")


def test_no_component_experts(batch):
    model = tiny_model(num_component_experts=0).eval()
    image, image_ae, masks, counts = batch
    with torch.no_grad():
        out = model(image, image_ae, masks, counts)
    assert out.routing_weights.shape[1] == 4
    assert out.map_component.abs().sum() == 0


@pytest.mark.parametrize("exclude", [True, False])
def test_images_without_component_masks_skip_component_experts(batch, exclude):
    model = tiny_model(top_k=3, exclude_components_without_masks=exclude).eval()
    with torch.no_grad():
        model.gating_network.gate[2].bias[4:] = 100.0  # the gate prefers the component experts
    image, image_ae, masks, counts = batch  # image 1 has no masks
    with torch.no_grad():
        out = model(image, image_ae, masks, counts)
    chosen = out.routing_weights[:, 4:] > 0
    assert chosen[counts > 0].all()
    assert chosen[1].any() != exclude
    assert (out.routing_weights > 0).sum(1).tolist() == [3] * 5


@pytest.mark.slow
def test_channels_last_and_compiled_experts_give_the_same_maps(batch):
    image, image_ae, masks, counts = batch
    reference = tiny_model().eval()
    variants = [accelerate(tiny_model(), channels_last=True),
                accelerate(tiny_model(), compile_experts=True, compile_backend="eager")]
    assert variants[0].global_experts[0].student[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference(image, image_ae, masks, counts)
        for variant in variants:
            variant.load_state_dict(reference.state_dict())  # same keys: compiled in place
            out = variant.eval()(image, image_ae, masks, counts)
            for name in ("map_patch", "map_global", "map_component"):
                torch.testing.assert_close(getattr(out, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
