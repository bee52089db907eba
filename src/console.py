"""What a run prints: each of Lightning's lines once, without its product tips and TPU line.

Importing ``lightning`` gives its ``lightning`` logger a console handler of its own
(``INFO: <message>``); under Hydra, whose root handlers (console and ``run.log``) also receive
Lightning's lines, every line then shows twice. Lightning also logs tips for its cloud products
whenever a trainer runs without them ("💡 Tip: ... litlogger ...", "... litmodels ..."), which no
setting turns off (Lightning-AI/pytorch-lightning#21294), and, on a machine without TPUs, a line
saying so (its GPU line stays: it says whether a GPU is used).
"""

from __future__ import annotations

import logging

# How the dropped lines begin: the product tips, and the TPU line on a machine without TPUs.
DROPPED = ("💡 Tip:", "TPU available: False")
LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"  # rank_zero_info, which logs them


class DropLightningNoise(logging.Filter):
    """Drops the lines of :data:`DROPPED`; every other line passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DROPPED)


def quiet_lightning() -> None:
    """Drop Lightning's lines of :data:`DROPPED` and, when the root logger has handlers (Hydra's),
    Lightning's own console handlers: its lines then reach the console once, and ``run.log``,
    through the root."""
    info = logging.getLogger(LIGHTNING_INFO)
    if not any(isinstance(f, DropLightningNoise) for f in info.filters):
        info.addFilter(DropLightningNoise())
    if not logging.getLogger().handlers:
        return
    # lightning.pytorch and lightning.fabric add a handler (and stop propagating) when imported
    # before the root logger had handlers; lightning adds one whatever the order.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # a console handler of Lightning's, not a file
                logger.removeHandler(handler)
        logger.propagate = True
