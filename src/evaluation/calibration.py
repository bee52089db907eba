"""Statistics of normal images: the inductive protocol's normalisation and the decision threshold.

For every class (and for all classes pooled, key ``all``), over the normal calibration images:

* ``low`` / ``high``: the smallest and largest value of each group's raw anomaly map
  (patch, global, component), the same statistics the paper protocol takes from the test set;
* ``threshold``: the ``quantile`` of the image scores of those images, each scored with the
  protocol's maps normalised by ``low`` / ``high``. An image whose score is at or above the
  threshold is called anomalous.

A model with component experts scores an image with component masks differently from one
without (its component map and routing change), so its calibration holds a second set,
``unmasked``: the same normal images scored without masks. An image is always scored with the
statistics of its own pipeline (:meth:`Calibration.get`), never an unmasked image against masked
statistics.

It is computed by :meth:`src.module.AnomalyMoEModule.calibrate` (at the end of a fit, before a
test of weights without one, in ``mode=predict``), travels inside Lightning checkpoints (key
``calibration``; ``last.ckpt`` holds the final weights' calibration) and is copied to
``calibration.json`` in the run folder that computed it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

GROUPS = ("patch", "global", "component")
POOLED = "all"


def threshold_rule(quantile: float) -> str:
    what = "largest" if quantile >= 1 else f"{quantile:g}-quantile of the"
    return (
        f"threshold = {what} image score(s) of the normal calibration images (normal training images), "
        "each scored with its anomaly maps min-max normalised by the calibration images' per-group "
        "minimum and maximum; score >= threshold means anomalous"
    )


@dataclass
class NormalStatistics:
    low: list[float]  # per group (GROUPS order): minimum of the raw maps
    high: list[float]  # per group: maximum of the raw maps
    threshold: float  # image-score threshold
    num_images: int
    score_mean: float
    score_max: float

    def tensors(self, device=None) -> tuple[Tensor, Tensor]:
        """(G,) low and high."""
        return torch.tensor(self.low, device=device), torch.tensor(self.high, device=device)


@dataclass
class Calibration:
    quantile: float
    stats: dict[str, NormalStatistics]  # "<dataset>/<class>" and "all"
    rule: str = ""
    groups: tuple[str, ...] = GROUPS
    notes: list[str] = field(default_factory=list)
    unmasked: dict[str, NormalStatistics] | None = None  # the same images without component masks

    def __post_init__(self) -> None:
        self.rule = self.rule or threshold_rule(self.quantile)

    def get(self, key: str | None, masks: bool = True) -> NormalStatistics:
        """Statistics of a class key, or of all classes pooled for ``None``/``"all"``; ``masks=False``:
        of images scored without component masks (KeyError when this calibration has none)."""
        key = key or POOLED
        stats = self.stats if masks else (self.unmasked or {})
        if key not in stats:
            what = "" if masks else " without component masks"
            raise KeyError(f"no calibration{what} for class {key!r}; calibrated: {sorted(stats)}")
        return stats[key]

    def to_dict(self) -> dict:
        data = {"quantile": self.quantile, "rule": self.rule, "groups": list(self.groups), "notes": list(self.notes),
                "stats": {k: asdict(v) for k, v in self.stats.items()}}
        if self.unmasked is not None:
            data["unmasked"] = {k: asdict(v) for k, v in self.unmasked.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        stats = {k: NormalStatistics(**v) for k, v in data["stats"].items()}
        unmasked = {k: NormalStatistics(**v) for k, v in data["unmasked"].items()} if "unmasked" in data else None
        return cls(data["quantile"], stats, data.get("rule", ""), tuple(data.get("groups", GROUPS)),
                   list(data.get("notes", [])), unmasked)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text()))

