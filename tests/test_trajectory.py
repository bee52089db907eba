"""Training step by step as the original: five steps of the original train.py loop (SPEC section 13),
replayed through a real ``lightning.Trainer`` fitting our module built from the project's config.

The fixture holds the original's initial weights (model and CLUB estimator), five batches, every
random draw (EIR expert pairs, CLUB permutations; dropout was off), and per step every loss, the
gradient norms before clipping, the routing and, after step 5, samples of every trained tensor.

* ``module.estimator_update=second_forward`` with ``module.loss.hard_mining=original`` is the
  original's step: every loss of every step and the final weights match.
* ``hard_mining=per_group`` (the documented fix) trains the patch experts differently: guarded.
* The default ``estimator_update=same_forward`` trains the estimator on the features of the same
  forward pass. The main losses of step 1 are the original's, the estimator then lags by one
  update; the drift this causes is stated and bounded here, not hidden.

Tolerances follow each quantity's scale, so they hold on any x86-64 CPU (docs/testing.md): a loss
term against its own size; EIR, the difference of two CLUB log-likelihood terms, against the size
of those terms (the estimator loss); weights against the change the original made in five steps.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from lightning import Callback, Trainer
from torch.utils.data import DataLoader

from src.models.weight_formats import (
    check_and_load,
    check_expert_counts,
    original_club_to_ours,
    original_to_ours,
    ours_to_original,
)
from tests.conftest import compose_cfg, official_fixture
from tests.test_parity import build_model, padded_masks

FIXTURE = official_fixture("official_trajectory_tiny.pt")

LOSSES = ("patch", "global", "component", "recon", "esb", "esb_importance", "esb_load", "esb_z", "loss")
GROUPS = ("patch_experts", "global_experts", "component_experts", "gating_network")
REL = 1e-5  # float32 rounding after five steps, relative to a quantity's scale (measured: below 1e-6)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


class ReplayedDraws:
    """The original's random draws in call order: ``sample`` for the EIR expert pairs (Python's
    ``random.sample``), ``shuffle`` for the CLUB permutations (``torch.randperm``)."""

    def __init__(self, draws: dict, phases: tuple[str, ...]) -> None:
        self.pairs = [d for d in draws["pairs"] if d["phase"] in phases]
        self.perms = list(draws["perms"])

    def seed(self, *args) -> None:  # the module seeds its pair stream at fit start
        pass

    def sample(self, population, k: int) -> list[int]:
        draw = self.pairs.pop(0)
        assert (len(population), k) == (draw["n"], draw["k"]), f"pair draw {draw} asked for ({len(population)}, {k})"
        return list(draw["pair"])

    def shuffle(self, n: int, device) -> torch.Tensor:
        draw = self.perms.pop(0)
        assert n == draw["n"], f"permutation draw {draw} asked for n={n}"
        return torch.tensor(draw["perm"], device=device)


class _Logged(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k[len("train/"):]: float(v) for k, v in trainer.callback_metrics.items()
                           if k.startswith("train/")})


def replay(fixture: dict, estimator_update: str, hard_mining: str) -> tuple[list[dict], object]:
    """Five steps of our module (the project's module config) from the fixture's start."""
    config = fixture["config"]
    net = build_model({
        "embed_dim": config["dim"], "num_heads": config["heads"], "depth": 12, "pos_embed_grid": 37,
        "interpolate_offset": 0.1, "num_patch_experts": config["num_patch"], "num_global_experts": config["num_global"],
        "num_component_experts": config["num_comp"], "top_k": config["top_k"], "target_layers": config["target_layers"],
        "fuse_train": config["fuse_train"], "fuse_eval": [list(range(8))], "decoder_depth": 8,
        "bottleneck_dropout": 0.0,
    }, "dense")
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # as in the fixture's run
    state = original_to_ours(fixture["state_dict"])
    check_expert_counts(state, net.expert_counts(), "trajectory fixture")
    check_and_load(net, state, "trajectory fixture")

    # The objects a run builds: the project's module config, with the original's schedule length.
    cfg = compose_cfg(["trainer.max_steps=100000", f"module.estimator_update={estimator_update}",
                       f"module.loss.hard_mining={hard_mining}"])
    module = instantiate(cfg.module, net=net)
    check_and_load(module.estimator, original_club_to_ours(fixture["club_state_dict"]), "trajectory fixture CLUB")
    phases = ("main", "estimator") if estimator_update == "second_forward" else ("main",)
    draws = ReplayedDraws(fixture["random"], phases)
    module.objective.pair_rng = draws
    module.objective.shuffle = draws.shuffle

    batches = []
    for b in fixture["batches"]:
        masks, counts = padded_masks(list(b["masks"]))
        batches.append({"image": b["image_st"].float(), "image_ae": b["image_ae"].float(), "masks": masks,
                        "num_masks": counts})
    logged = _Logged()
    trainer = Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[logged], log_every_n_steps=1)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert not draws.pairs and not draws.perms, "every recorded draw is used, in order"
    return logged.steps, module


def change_error(fixture: dict, module) -> dict[str, float]:
    """Per trained group: || ours - original || / || original - start || over the fixture's sampled
    entries (the start is the fixture's initial weights): 0 is the original's trajectory."""
    ours = ours_to_original({k: v for k, v in module.net.state_dict().items()})
    diff = {g: [0.0, 0.0] for g in GROUPS}
    for name, sample in fixture["final"].items():
        group = name.split(".")[0]
        start = fixture["state_dict"][name].float().flatten()[sample["index"]]
        mine = ours[name].flatten()[sample["index"]]
        diff[group][0] += float((mine - sample["value"]).pow(2).sum())
        diff[group][1] += float((sample["value"] - start).pow(2).sum())
    return {g: (a / b) ** 0.5 for g, (a, b) in diff.items()}


def club_change_error(fixture: dict, module) -> float:
    ours = module.estimator.state_dict()
    mapped = {k: ours[v] for k, v in zip(fixture["club_state_dict"],
                                          original_club_to_ours(fixture["club_state_dict"]), strict=True)}
    num = den = 0.0
    for name, sample in fixture["final_club"].items():
        start = fixture["club_state_dict"][name].float().flatten()[sample["index"]]
        num += float((mapped[name].flatten()[sample["index"]] - sample["value"]).pow(2).sum())
        den += float((sample["value"] - start).pow(2).sum())
    return (num / den) ** 0.5


def check_step(ours: dict, expected: dict, names=LOSSES) -> None:
    for name in names:
        scale = max(abs(expected[name]), 1e-3 * abs(expected["loss"]))
        assert ours[name] == pytest.approx(expected[name], abs=REL * scale), (expected["step"], name)


@pytest.mark.slow
def test_the_original_step_reproduces_the_original_trajectory(fixture):
    steps, module = replay(fixture, "second_forward", "original")
    assert len(steps) == len(fixture["steps"]) == 5
    for ours, expected in zip(steps, fixture["steps"], strict=True):
        step = expected["step"]
        assert ours["lr"] == pytest.approx(expected["lr"], rel=1e-6, abs=1e-12), step
        check_step(ours, expected)
        # EIR: two CLUB log-likelihood terms of the size of the estimator loss, minus each other.
        assert ours["eir"] == pytest.approx(expected["eir"], abs=REL * abs(expected["estimator"])), step
        assert ours["estimator"] == pytest.approx(expected["estimator"], rel=REL), step
        assert ours["grad_norm"] == pytest.approx(expected["grad_norm"], rel=REL), step
        assert ours["estimator_grad_norm"] == pytest.approx(expected["estimator_grad_norm"], rel=REL), step
        # Routing: the share of the batch's images routed to each expert.
        sets = expected["topk_sets"]
        names = [f"{g}{i}" for g in ("patch", "global", "component") for i in range(2)]
        loads = [ours[f"load_{n}"] for n in names]
        assert loads == pytest.approx([sum(e in s for s in sets) / len(sets) for e in range(6)]), step
    errors = change_error(fixture, module)
    assert all(e < 1e-3 for e in errors.values()), errors
    assert club_change_error(fixture, module) < 1e-3


@pytest.mark.slow
def test_per_group_hard_mining_trains_the_patch_experts_differently(fixture):
    """The documented fix (each fuse group's own mask, k = int(0.1 n)) is not the original's step:
    the values of step 1 are the same (hard mining shapes gradients only), the patch experts'
    gradients and so their weights are not."""
    steps, module = replay(fixture, "second_forward", "per_group")
    check_step(steps[0], fixture["steps"][0])
    assert steps[0]["grad_norm"] != pytest.approx(fixture["steps"][0]["grad_norm"], rel=1e-5)
    errors = change_error(fixture, module)
    assert errors["patch_experts"] > 0.2, errors  # measured 0.51 of the original's change


@pytest.mark.slow
def test_the_default_step_states_its_drift_from_the_original(fixture):
    """The same-forward estimator update (the default): step 1's main losses are the original's; the
    estimator trains on the pre-update features of the main EIR pairs, so its loss and EIR drift
    from the original's, and through EIR (weight 1e-4) the experts' updates a little.

    Measured drift (5 steps): estimator loss up to 7 %, EIR up to 5e-3, reconstruction losses
    below 1e-6 relative; final weights off by 0.18 of the original's change for the global experts,
    0.002 for the patch experts, below 1e-5 for component experts and gate, 0.69 for the CLUB
    estimator. The bounds below leave room for other CPUs and guard against a larger drift.
    """
    steps, module = replay(fixture, "same_forward", "original")
    first, expected = steps[0], fixture["steps"][0]
    check_step(first, expected)
    assert first["eir"] == pytest.approx(expected["eir"], abs=REL * abs(expected["estimator"]))
    # Not pretended equal: the estimator sees other features (the main pairs, before the update).
    assert first["estimator"] != pytest.approx(expected["estimator"], rel=1e-2)
    for ours, expected in zip(steps, fixture["steps"], strict=True):
        assert ours["estimator"] == pytest.approx(expected["estimator"], rel=0.15), expected["step"]
        assert ours["eir"] == pytest.approx(expected["eir"], abs=2e-3 * abs(expected["estimator"])), expected["step"]
        assert ours["recon"] == pytest.approx(expected["recon"], rel=1e-4), expected["step"]
    errors = change_error(fixture, module)
    assert errors["global_experts"] < 0.5 and errors["patch_experts"] < 0.05, errors
    assert errors["component_experts"] < 1e-3 and errors["gating_network"] < 1e-3, errors
    assert club_change_error(fixture, module) > 0.1  # the estimator's own trajectory is another one
