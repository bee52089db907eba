"""AnomalyMoE training objective (SPEC section 7): the loss terms as functions of tensors, and
:class:`Objective`, which assembles them (with the CLUB estimator and the EIR pair choice).

L = L_patch + L_global + L_comp + lambda_eir * EIR + lambda_esb * ESB, with
* L_patch: hard-mining cosine reconstruction of the patch experts (SPEC 7.1),
* L_global: autoencoder and student losses of the global experts (SPEC 7.2),
* L_comp: cosine reconstruction of the component vectors (SPEC 7.3),
* ESB, *Expert Selection Balancing*: importance + load + router-z terms (SPEC 7.4),
* EIR, *Expert Information Repulsion*: a CLUB upper bound on the mutual information between
  the features of two experts of one group (SPEC 7.5), estimated by :class:`CLUBEstimator`.

Every expert's per-image loss is weighted by its routing weight and averaged over the whole
batch (experts that did not run on an image have weight 0 there), so sparse and dense
dispatch give the same values.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.outputs import ComponentRun, GlobalRun, PatchRun, TrainOutput, split_experts


@dataclass
class LossWeights:
    """Coefficients of the objective; defaults are the original's."""

    lambda_esb: float = 0.01  # ESB coefficient
    lambda_eir: float = 1e-4  # EIR coefficient
    hard_mining_ratio: float = 0.1  # fraction of hardest points keeping their full gradient
    hard_mining_factor: float = 0.1  # gradient factor of the other points
    # "original": the original's rule (SPEC 7.1): k = int(n * (1 - (1 - ratio))) in floating point
    # (7 of 80 points, not 8) and every fuse group of an expert scaled with the last group's mask;
    # "per_group": k = int(n * ratio) and each group's own mask (a documented fix).
    hard_mining: str = "original"
    global_scale: float = 0.1  # scale of the global-expert loss
    component_scale: float = 0.1  # scale of the component-expert loss
    capacity_factor: float = 4.0  # ESB load term: capacity = capacity_factor * B / E
    club_full_likelihood: bool = False  # True adds the -log(var) term the original omits (SPEC B6)

    HARD_MINING = ("original", "per_group")

    def __post_init__(self) -> None:
        if self.hard_mining not in self.HARD_MINING:
            raise ValueError(f"module.loss.hard_mining={self.hard_mining!r} is not one of {list(self.HARD_MINING)}")


def _scale_easy_gradients(tensor: Tensor, easy: Tensor, factor: float) -> None:
    """Multiply the gradient reaching ``tensor`` by ``factor`` at ``easy`` points (all channels).

    A hook on the tensor itself, as in the original, so every gradient into the decoder map
    (the EIR feature is pooled from it) is scaled.
    """
    if tensor.requires_grad:
        scale = torch.where(easy, factor, 1.0).unsqueeze(1).to(tensor.dtype)  # (n, 1, h, w)
        tensor.register_hook(lambda grad: grad * scale)


def hard_mining_k(points: int, weights: LossWeights) -> int:
    """How many of ``points`` distances keep their full gradient.

    The original computes ``int(n * (1 - p_hm))`` with ``p_hm = 0.9``; ``1 - 0.9`` is
    0.09999999999999998, so n = 80 keeps 7 points. ``per_group`` keeps ``int(n * ratio)`` (8).
    """
    if weights.hard_mining == "original":
        k = int(points * (1 - (1 - weights.hard_mining_ratio)))
    else:
        k = int(points * weights.hard_mining_ratio)
    return max(1, k)


def patch_loss(
    en_maps: Sequence[Tensor], runs: Sequence[PatchRun | None], routing: Tensor, weights: LossWeights
) -> Tensor:
    """L_patch = sum_i mean_b r_bi * mean_g mean_hw (1 - cos(E_g, D_ig)) (SPEC 7.1).

    Hard mining only shapes gradients: points below the k-th largest distance of this expert
    and group (k from :func:`hard_mining_k`) get their gradient scaled by ``hard_mining_factor``.
    With ``hard_mining="original"`` every group of an expert is scaled with the easy points of
    its *last* group, as the original's late-bound hook does; ``per_group`` uses each group's own.
    """
    batch = routing.shape[0]
    total = routing.new_zeros(())
    for i, run in enumerate(runs):
        if run is None:
            continue
        per_image = 0.0
        easy_masks = []
        for en_map, de_map in zip(en_maps, run.de_maps, strict=True):
            distance = 1 - F.cosine_similarity(en_map[run.rows].detach(), de_map, dim=1)  # (n, h, w)
            with torch.no_grad():
                threshold = torch.topk(distance.flatten(), hard_mining_k(distance.numel(), weights)).values[-1]
                easy_masks.append(distance < threshold)
            per_image = per_image + distance.mean(dim=(1, 2))
        if weights.hard_mining == "original":
            easy_masks = [easy_masks[-1]] * len(easy_masks)
        for de_map, easy in zip(run.de_maps, easy_masks, strict=True):
            _scale_easy_gradients(de_map, easy, weights.hard_mining_factor)
        per_image = per_image / len(run.de_maps)
        total = total + (routing[run.rows, i] * per_image).sum() / batch
    return total


def global_loss(target: Tensor, runs: Sequence[GlobalRun | None], routing: Tensor, weights: LossWeights) -> Tensor:
    """L_global = sum_j mean_b r_bj * scale * (mse(A_j, T) + mse(S_j, A_j)) (SPEC 7.2)."""
    batch = routing.shape[0]
    total = routing.new_zeros(())
    for j, run in enumerate(runs):
        if run is None:
            continue
        ae = run.autoencoder
        if ae.shape[-2:] != target.shape[-2:]:
            ae = F.interpolate(ae, size=target.shape[-2:], mode="bilinear")
        loss_ae = (ae - target[run.rows]).pow(2).mean(dim=(1, 2, 3))
        loss_st = (run.student - ae).pow(2).mean(dim=(1, 2, 3))
        total = total + (routing[run.rows, j] * weights.global_scale * (loss_ae + loss_st)).sum() / batch
    return total


def component_loss(
    features: Tensor, image_index: Tensor, runs: Sequence[ComponentRun | None], routing: Tensor, weights: LossWeights
) -> Tensor:
    """L_comp = sum_m mean_c r_{b(c)m} * scale * (1 - cos(CAE_m(f_c), f_c)) over all components (SPEC 7.3)."""
    total = routing.new_zeros(())
    count = features.shape[0]
    for m, run in enumerate(runs):
        if run is None:
            continue
        distance = 1 - F.cosine_similarity(run.reconstruction, features[run.rows], dim=1)
        total = total + (routing[image_index[run.rows], m] * weights.component_scale * distance).sum() / count
    return total


def esb_loss(logits: Tensor, expert_mask: Tensor, capacity_factor: float = 4.0) -> dict[str, Tensor]:
    """Expert Selection Balancing (SPEC 7.4).

    importance = E * sum_j (mean_b softmax(z)_bj)^2; load = sum_j relu(count_j - cap)^2 with
    cap = capacity_factor * B / E (counts come from the top-k one-hot: no gradient, as in the
    original); z = mean z^2.
    """
    batch, num_experts = logits.shape
    importance = num_experts * torch.softmax(logits, dim=1).mean(0).pow(2).sum()
    capacity = capacity_factor * batch / num_experts
    load = F.relu(expert_mask.float().sum(0) - capacity).pow(2).sum()
    z_loss = logits.pow(2).mean()
    return {"importance": importance, "load": load, "z": z_loss, "total": importance + load + z_loss}


# --------------------------------------------------------------------------- EIR / CLUB
class CLUBNet(nn.Module):
    """Variational q(y | x) = N(mu(x), exp(logvar(x))) of CLUB (Cheng et al., 2020)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.p_mu = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.p_logvar = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Tanh())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.p_mu(x), self.p_logvar(x)


class CLUBEstimator(nn.Module):
    """Mutual-information estimator behind EIR: a shared LayerNorm and one CLUB net per group.

    ``upper_bound`` (the EIR term) runs with the estimator's parameters detached: the original
    discards the estimator gradients of that term anyway, and this way one backward pass can
    serve both the main objective and the estimator's own loss (which sees detached features).
    """

    GROUPS = ("patch", "global")

    def __init__(self, dim: int, full_likelihood: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.nets = nn.ModuleDict({g: CLUBNet(dim, dim // 2) for g in self.GROUPS})
        self.full_likelihood = full_likelihood

    def _heads(self, group: str, x: Tensor, y: Tensor, frozen: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        def call(module: nn.Module, *args: Tensor):
            if not frozen:
                return module(*args)
            params = {k: v.detach() for k, v in module.named_parameters()}
            return torch.func.functional_call(module, params, args)

        # In float32 under autocast (trainer.precision=bf16-mixed): the bound is a small difference
        # of two large sums, which bf16's 8-bit mantissa loses (docs/speed.md).
        with torch.autocast(x.device.type, enabled=False):
            x, y = call(self.norm, x.float()), call(self.norm, y.float())
            mu, logvar = call(self.nets[group], x)
        return x, y, mu, logvar

    def upper_bound(self, group: str, x: Tensor, y: Tensor, frozen: bool = True, perm: Tensor | None = None) -> Tensor:
        """CLUB bound 1/2 mean_b [log q(y_b|x_b) - log q(y_pi(b)|x_b)] (without constants);
        ``perm`` is pi (a fresh ``torch.randperm`` when not given)."""
        x, y, mu, logvar = self._heads(group, x, y, frozen)
        if perm is None:
            perm = torch.randperm(y.shape[0], device=y.device)
        shuffled = y[perm]
        positive = -((mu - y) ** 2) / logvar.exp()
        negative = -((mu - shuffled) ** 2) / logvar.exp()
        return (positive.sum(-1) - negative.sum(-1)).mean() / 2

    def log_likelihood(self, group: str, x: Tensor, y: Tensor) -> Tensor:
        """mean_b sum_d log q(y|x), without the -logvar/2 term unless ``full_likelihood`` (SPEC B6)."""
        x, y, mu, logvar = self._heads(group, x, y, frozen=False)
        ll = -((mu - y) ** 2) / (2 * logvar.exp())
        if self.full_likelihood:
            ll = ll - logvar / 2
        return ll.sum(-1).mean()


def select_eir_pairs(
    runs: Sequence[PatchRun | GlobalRun | None], batch: int, rng: random.Random
) -> tuple[Tensor, Tensor] | None:
    """Pick the feature pairs (x_b, y_b) of two distinct experts of one group.

    When every expert ran on the whole batch (dense dispatch) this is the original's rule: one
    random pair of experts for all images. With sparse dispatch an expert only has features for
    its routed images, so each image gets its own random pair among the experts that ran on it;
    images with fewer than two such experts are left out. ``None`` when fewer than two images
    remain (the bound needs a shuffle).
    """
    present = [(e, r) for e, r in enumerate(runs) if r is not None]
    if len(present) < 2:
        return None
    if all(r.rows.numel() == batch for _, r in present) and len(present) == len(runs):
        first, second = rng.sample(range(len(runs)), 2)
        return runs[first].feature, runs[second].feature
    feature = present[0][1].feature
    table = feature.new_zeros(len(runs), batch, feature.shape[1])  # (experts, B, C)
    has = torch.zeros(len(runs), batch, dtype=torch.bool, device=feature.device)
    for e, run in present:
        table = table.index_put((torch.full_like(run.rows, e), run.rows), run.feature)
        has[e, run.rows] = True
    xs, ys = [], []
    for b in range(batch):
        experts = has[:, b].nonzero().flatten().tolist()
        if len(experts) >= 2:
            first, second = rng.sample(experts, 2)
            xs.append(table[first, b])
            ys.append(table[second, b])
    if len(xs) < 2:
        return None
    return torch.stack(xs), torch.stack(ys)


# --------------------------------------------------------------------------- the objective
@dataclass
class LossTerms:
    """The objective's terms for one batch (scalars). ``loss`` is what the main optimiser
    minimises; ``estimator`` is the CLUB estimator's own loss, which reaches only its parameters."""

    patch: Tensor  # L_patch
    global_: Tensor  # L_global
    component: Tensor  # L_comp
    esb_importance: Tensor
    esb_load: Tensor
    esb_z: Tensor
    esb: Tensor  # importance + load + z
    eir: Tensor  # CLUB bound, mean over the patch and global groups
    recon: Tensor  # patch + global + component
    loss: Tensor  # recon + lambda_eir * eir + lambda_esb * esb
    estimator: Tensor  # -(mean over groups of log q(y|x)) on the detached EIR pairs
    pairs: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)  # EIR pairs per group

    def as_dict(self) -> dict[str, Tensor]:
        """The terms by their logged names (``global`` for ``global_``), without the pairs."""
        return {f.name.rstrip("_"): getattr(self, f.name) for f in fields(self) if f.name != "pairs"}


class Objective:
    """The training objective of SPEC section 7 for one model's expert groups.

    Holds the CLUB estimator behind EIR and the random stream that picks the EIR expert pairs
    (``pair_rng``, saved in checkpoints by the Lightning module). Not an ``nn.Module``: the
    Lightning module registers ``estimator`` itself, so its parameters keep their checkpoint
    names (``estimator.*``).

    Args:
        dim: feature width of the experts' pooled vectors (the encoder's embedding width).
        num_experts: patch, global and component experts of the model.
        weights: loss coefficients.
    """

    GROUPS = CLUBEstimator.GROUPS

    def __init__(self, dim: int, num_experts: Sequence[int], weights: LossWeights | None = None) -> None:
        self.weights = weights or LossWeights()
        self.num_experts = tuple(num_experts)
        self.estimator = CLUBEstimator(dim, self.weights.club_full_likelihood)
        self.pair_rng = random.Random(0)

    def __call__(self, out: TrainOutput) -> LossTerms:
        """Every term for the model's training output ``out``; draws the EIR pairs from ``pair_rng``."""
        w = self.weights
        r_p, r_g, r_k = split_experts(out.routing_weights, self.num_experts)
        patch = patch_loss(out.en_maps, out.patch, r_p, w)
        global_ = global_loss(out.global_target, out.global_, r_g, w)
        component = component_loss(out.component_features, out.component_image, out.component, r_k, w)
        esb = esb_loss(out.logits, out.expert_mask, w.capacity_factor)
        pairs = self.eir_pairs(out)
        # Mean over the two groups as in the original; a group without a pair counts 0.
        bounds = [self.estimator.upper_bound(g, x, y, perm=self.shuffle(x.shape[0], x.device))
                  for g, (x, y) in pairs.items()]
        eir = torch.stack(bounds).sum() / 2 if bounds else out.logits.new_zeros(())
        recon = patch + global_ + component
        return LossTerms(
            patch=patch, global_=global_, component=component,
            esb_importance=esb["importance"], esb_load=esb["load"], esb_z=esb["z"], esb=esb["total"],
            eir=eir, recon=recon, loss=recon + w.lambda_eir * eir + w.lambda_esb * esb["total"],
            estimator=self.estimator_loss(pairs, out.logits), pairs=pairs,
        )

    def shuffle(self, n: int, device: torch.device) -> Tensor:
        """The permutation of the CLUB bound's negatives (the original's ``torch.randperm``); with
        ``pair_rng``, the objective's random draws."""
        return torch.randperm(n, device=device)

    def eir_pairs(self, out: TrainOutput) -> dict[str, tuple[Tensor, Tensor]]:
        """The (x, y) feature pairs of two experts per group (groups without a pair left out)."""
        batch = out.logits.shape[0]
        pairs = {}
        for group, runs in zip(self.GROUPS, (out.patch, out.global_), strict=True):
            pair = select_eir_pairs(runs, batch, self.pair_rng)
            if pair is not None:
                pairs[group] = pair
        return pairs

    def estimator_loss(self, pairs: dict[str, tuple[Tensor, Tensor]], like: Tensor) -> Tensor:
        """-(mean over groups of log q(y|x)) on the detached pairs (a zero like ``like`` without pairs)."""
        ll = [self.estimator.log_likelihood(g, x.detach(), y.detach()) for g, (x, y) in pairs.items()]
        return -torch.stack(ll).sum() / 2 if ll else like.new_zeros(())
