"""Equivalence with the original code, on the outputs it produced (SPEC section 12).

The fixture holds a reduced official model's state dict (official key names), its inputs and
its outputs. Set ``ANOMALYMOE_FIXTURES`` to the folder holding ``official_tiny.pt`` (default
``../shared/fixtures``); with ``ANOMALYMOE_REQUIRE_FIXTURES=1`` a missing file fails instead of
skipping. ``ANOMALYMOE_PARITY_DEVICE=cuda`` runs the model on the GPU (TF32 off: full fp32).
"""

from __future__ import annotations

import os

import pytest
import torch

from src.evaluation.evaluator import AnomalyEvaluator
from src.losses import Objective
from src.measure.original_structure import ORIGINAL_OPTIONS, OriginalStructure
from src.models.anomalymoe import AnomalyMoE
from src.models.backbone import DinoV2Backbone
from src.models.weight_formats import CheckpointError, check_and_load, check_expert_counts, original_to_ours
from tests.conftest import official_fixture

FIXTURE = official_fixture("official_tiny.pt")
DEVICE = torch.device(os.environ.get("ANOMALYMOE_PARITY_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


STRUCTURES = {
    "sparse": (AnomalyMoE, {"dispatch": "sparse"}),
    "dense": (AnomalyMoE, {"dispatch": "dense"}),
    # What the benchmark times as "the original": dense experts and two full encoder passes.
    "original": (OriginalStructure, ORIGINAL_OPTIONS),
}


def build_model(config: dict, structure: str = "sparse") -> AnomalyMoE:
    backbone = DinoV2Backbone(
        weights="from_checkpoint",
        arch_overrides={"embed_dim": config["embed_dim"], "num_heads": config["num_heads"], "depth": config["depth"]},
        pos_grid=config["pos_embed_grid"],
        interpolate_offset=config["interpolate_offset"],
    )
    model_class, options = STRUCTURES[structure]
    return model_class(
        backbone,
        num_patch_experts=config["num_patch_experts"],
        num_global_experts=config["num_global_experts"],
        num_component_experts=config["num_component_experts"],
        top_k=config["top_k"],
        target_layers=config["target_layers"],
        fuse_groups_train=config["fuse_train"],
        fuse_groups_eval=config["fuse_eval"],
        decoder_depth=config["decoder_depth"],
        bottleneck_dropout=config["bottleneck_dropout"],
        exclude_components_without_masks=False,  # the original's routing
        **options,
    )


def padded_masks(masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(m.shape[0] for m in masks)
    out = torch.zeros(len(masks), k, *masks[0].shape[-2:], dtype=torch.uint8)
    for i, m in enumerate(masks):
        out[i, : m.shape[0]] = m
    return out, torch.tensor([m.shape[0] for m in masks])


@pytest.fixture(scope="module", params=list(STRUCTURES))
def run(request, fixture):
    """Our model, loaded from the official state dict, on the fixture inputs."""
    model = build_model(fixture["config"], request.param)
    state = original_to_ours({f"module.{k}": v for k, v in fixture["state_dict"].items()})  # DDP prefix too
    check_expert_counts(state, model.expert_counts(), "fixture")
    check_and_load(model, state, "fixture")
    model.eval().to(DEVICE)
    inputs = fixture["inputs"]
    masks, counts = padded_masks(inputs["masks"])
    args = [t.to(DEVICE) for t in (inputs["image_st"].float(), inputs["image_ae"].float(), masks, counts)]
    if DEVICE.type == "cuda":  # the fixture was computed in full fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        prediction = model(*args)
        train_out = model.forward_train(*args)
    prediction = _replace_all(prediction, lambda t: t.cpu())
    return model, prediction, train_out


def test_routing_matches(run, fixture):
    _, prediction, _ = run
    expected = fixture["outputs"]
    top = lambda w: torch.topk(w, fixture["config"]["top_k"], dim=1).indices.sort(dim=1).values  # noqa: E731
    assert torch.equal(top(prediction.routing_weights), top(expected["routing_weights"]))
    assert (prediction.routing_weights != 0).sum(1).tolist() == [fixture["config"]["top_k"]] * 4
    torch.testing.assert_close(prediction.routing_weights, expected["routing_weights"], atol=1e-5, rtol=0)
    torch.testing.assert_close(prediction.logits, expected["raw_logits"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["map_patch", "map_global", "map_component"])
def test_raw_maps_match(run, fixture, name):
    _, prediction, _ = run
    expected = fixture["outputs"][name]
    ours = getattr(prediction, name)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-4, f"{name}: max error {(ours - expected).abs().max():.3g}"


def test_final_maps_and_scores_match(run, fixture):
    _, prediction, _ = run
    inputs, expected = fixture["inputs"], fixture["outputs"]
    evaluator = AnomalyEvaluator(
        protocol="paper",
        keep_maps=4,  # keeps every final map of the 4 images
        eval_size=fixture["config"]["eval_size"],
        kernel_size=fixture["config"]["gaussian_kernel"],
        sigma=fixture["config"]["gaussian_sigma"],
        top_fraction=fixture["config"]["top_percent"],
    )
    batch = {"index": torch.arange(4), "class_index": torch.zeros(4, dtype=torch.long), "label": inputs["labels"],
             "gt_mask": inputs["gt_masks"]}
    # Two updates of two images each: the protocol streams over batches.
    evaluator.update(_slice(prediction, slice(0, 2)), {k: v[:2] for k, v in batch.items()})
    evaluator.update(_slice(prediction, slice(2, 4)), {k: v[2:] for k, v in batch.items()})
    result = evaluator.evaluate()[0]
    final_maps = result.example_maps[torch.argsort(result.example_index)]
    assert (final_maps - expected["final_maps_256"]).abs().max() <= 1e-4
    assert (result.image_scores - expected["image_scores"]).abs().max() <= 1e-4
    assert result.metrics["image_auroc"] == pytest.approx(expected["image_auroc"], abs=1e-6)
    assert result.metrics["pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-4)


def _replace_all(prediction, fn):
    from dataclasses import fields, replace

    return replace(prediction, **{f.name: fn(getattr(prediction, f.name)) for f in fields(prediction)})


def _slice(prediction, index):
    return _replace_all(prediction, lambda t: t[index])


def eval_mode_losses(model: AnomalyMoE, out) -> dict[str, torch.Tensor]:
    """The training loss terms of ``out`` (``forward_train`` in eval mode) that the fixture has."""
    terms = Objective(model.encoder.embed_dim, model.num_experts)(out).as_dict()
    return {name: terms[name] for name in ("patch", "global", "component", "esb", "recon")}


def test_eval_mode_training_losses_match(run, fixture):
    model, _, out = run
    for name, value in eval_mode_losses(model, out).items():
        expected = fixture["losses_train_fuse_eval_mode"][name]
        assert value.item() == pytest.approx(expected.item(), rel=1e-4), name


def test_component_counts_match(run, fixture):
    _, _, out = run
    counts = torch.bincount(out.component_image.cpu(), minlength=4).tolist()
    assert counts == fixture["outputs"]["num_components"]


def test_wrong_expert_split_is_refused(fixture):
    state = original_to_ours(fixture["state_dict"])
    with pytest.raises(CheckpointError, match="num_patch_experts=3; set model.num_patch_experts=2"):
        check_expert_counts(state, {"patch_experts": 3, "global_experts": 1, "component_experts": 2}, "fixture")


def test_missing_and_misshaped_keys_are_listed(fixture):
    model = build_model(fixture["config"], "sparse")
    state = original_to_ours(fixture["state_dict"])
    state.pop("gating_network.gate.0.bias")
    state["patch_experts.0.bottleneck.0.fc1.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        check_and_load(model, state, "fixture")
    assert "missing keys: gating_network.gate.0.bias" in str(err.value)
    assert "patch_experts.0.bottleneck.0.fc1.bias: checkpoint (3,)" in str(err.value)
