"""The parameters of each part of the model, logged when training starts.

It stands in for Lightning's model summary (``trainer.enable_model_summary=false``), whose FLOPs
column needs an example input and reads 0 without one, and which lists the evaluators (no
parameters) and counts modules in train and eval mode.
"""

from __future__ import annotations

import logging

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn

log = logging.getLogger(__name__)


def _what(module: nn.Module) -> str:
    if isinstance(module, nn.ModuleList) and len(module):
        return f"{len(module)} x {type(module[0]).__name__}"
    return getattr(module, "architecture", None) or type(module).__name__


def _count(module: nn.Module, trained_only: bool = False) -> str:
    count = sum(p.numel() for p in module.parameters() if p.requires_grad or not trained_only)
    return get_human_readable_count(count).strip() if count else ""


def parameter_table(pl_module: LightningModule) -> str:
    """A Markdown table: one row per part with parameters (the torch model ``net``'s parts, then
    the module's own, such as the CLUB estimator), its parameters and those trained."""
    parts = []
    for name, child in pl_module.named_children():
        if child is getattr(pl_module, "net", None):
            parts += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            parts.append((name, child))
    lines = ["| part | what | parameters | trained |", "|---|---|---|---|"]
    for name, part in parts:
        if _count(part):  # the evaluators and the calibrator have none
            lines.append(f"| {name} | {_what(part)} | {_count(part)} | {_count(part, trained_only=True) or 'frozen'} |")
    lines.append(f"| **total** | | {_count(pl_module)} | {_count(pl_module, trained_only=True)} |")
    return "\n".join(lines)


class ParameterSummary(Callback):
    """Logs :func:`parameter_table` once, when fitting starts."""

    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log.info("Parameters per part of the model\n\n%s\n", parameter_table(pl_module))
