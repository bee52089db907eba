"""Downloaded datasets: converted into the MVTec AD layout by ``mode=prepare`` (the kind's
converter in :data:`CONVERTERS`), then read like any source in that layout."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from data_modules.prepare import mvtec, others
from data_modules.prepare.common import Writer
from data_modules.sources.base import Source

CONVERTERS: dict[str, Callable[..., None]] = {
    "mvtec_ad": mvtec.convert_mvtec_ad,
    "visa": others.convert_visa,
    "mvtec_loco": mvtec.convert_mvtec_loco,
    "mvtec_3d": mvtec.convert_mvtec_3d,
    "ped2": others.convert_ped2,
    "bmad": others.convert_bmad,
}


class PreparedSource(Source):
    """A downloaded dataset: converted by ``mode=prepare`` with ``CONVERTERS[kind]``, then read
    in the MVTec AD layout (the base class).

    Args:
        kind: a key of :data:`CONVERTERS`.
        subset: ``bmad`` only: the subset folder (BrainMRI, LiverCT or RESC).
    """

    def __init__(self, kind: str, subset: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.format = kind  # recorded in the prepared dataset's marker
        self.converter = partial(CONVERTERS[kind], subset=subset) if subset else CONVERTERS[kind]

    def convert(self, source: Path, writer: Writer) -> None:
        self.converter(source, writer)
