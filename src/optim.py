"""StableAdamW and the warm-up + cosine schedule of the original (SPEC 7.8).

Maintained libraries were checked first: ``torch-optimi``'s and ``pytorch-optimizer``'s
StableAdamW have no AMSGrad and compute the update-clipping RMS from the second moment, so
they give different updates. The original's rule is written here once and tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class StableAdamW(Optimizer):
    """AdamW with AMSGrad and per-tensor update clipping (Wortsman et al., 2023).

    For each parameter that has a gradient (others are skipped entirely, weight decay too):
        theta <- theta * (1 - lr * wd)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  v_max <- max(v_max, v)
        den = sqrt(v_max) / sqrt(1 - b2^t) + eps
        s = max(1, RMS(g / den) / clip_threshold)
        theta <- theta - lr / (1 - b1^t) / s * m / den
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-10,
        weight_decay: float = 1e-4,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid StableAdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                p.mul_(1 - lr * wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                rms = (grad / denom).norm() / math.sqrt(grad.numel())
                scale = max(1.0, float(rms) / group["clip_threshold"])
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t) / scale)
        return loss


def warm_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """Learning-rate factor of the original ``WarmCosineScheduler`` (SPEC 7.8, B10).

    Warm-up is ``linspace(0, 1, warmup_steps)`` (factor 0 at step 0, 1 at the last warm-up step),
    then a cosine from 1 to ``final_ratio`` over ``total_steps - warmup_steps`` steps, then
    ``final_ratio``.
    """
    if step < warmup_steps:
        return step / (warmup_steps - 1) if warmup_steps > 1 else 1.0
    if step >= total_steps:
        return final_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_ratio + 0.5 * (1 - final_ratio) * (1 + math.cos(math.pi * progress))


def warm_cosine_schedule(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, final_lr: float = 5e-6
) -> LambdaLR:
    """Per-step ``LambdaLR`` with :func:`warm_cosine_factor`; ``final_lr`` is absolute."""
    base = optimizer.param_groups[0]["lr"]
    final_ratio = final_lr / base if base > 0 else 0.0
    return LambdaLR(optimizer, lambda step: warm_cosine_factor(step, warmup_steps, total_steps, final_ratio))
