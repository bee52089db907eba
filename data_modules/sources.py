"""The kinds of dataset source: ``dataset.sources.<name>.kind`` names how a source is read.

Every downloaded dataset is converted into the MVTec AD layout by ``mode=prepare`` (its
converter in :data:`CONVERTERS`) and then read the same way (:class:`PreparedSource`); the
built-in demo is generated on first use; a user's own folder is read in place.

========== =================================================================================
kind        what it is
========== =================================================================================
mvtec_ad    MVTec AD: already in the layout; ``mode=prepare`` checks (and, given a source, links) it
visa        VisA, one-class split (``split_csv/1cls.csv``)
mvtec_loco  MVTec LOCO AD: logical and structural anomalies as two defect types; own validation split
mvtec_3d    MVTec 3D-AD: the RGB images; the xyz point clouds kept under ``<class>/xyz``
ped2        UCSD Ped2 frames as one class ``pedestrian``
bmad        one BMAD subset (``subset``: BrainMRI, LiverCT or RESC) as one class; own validation split
demo        the built-in synthetic data (:mod:`data_modules.demo`)
folder      a user's own images, read in place (:mod:`data_modules.folder`)
========== =================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from data_modules.base import DataError, SourceDataModule
from data_modules.demo import DemoDataModule
from data_modules.folder import FolderDataModule
from data_modules.prepare import mvtec, others
from data_modules.prepare.common import Writer

CONVERTERS: dict[str, Callable[..., None]] = {
    "mvtec_ad": mvtec.convert_mvtec_ad,
    "visa": others.convert_visa,
    "mvtec_loco": mvtec.convert_mvtec_loco,
    "mvtec_3d": mvtec.convert_mvtec_3d,
    "ped2": others.convert_ped2,
    "bmad": others.convert_bmad,
}


class PreparedSource(SourceDataModule):
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


SOURCE_KINDS: dict[str, Callable[..., SourceDataModule]] = {
    **{kind: partial(PreparedSource, kind) for kind in CONVERTERS},
    "demo": DemoDataModule,
    "folder": FolderDataModule,
}


def source_class(kind: str) -> type[SourceDataModule]:
    """The data module class of a source ``kind``."""
    if kind not in SOURCE_KINDS:
        raise DataError(f"dataset.sources.<name>.kind={kind!r} is not a source kind; use one of {sorted(SOURCE_KINDS)}")
    factory = SOURCE_KINDS[kind]
    return factory.func if isinstance(factory, partial) else factory


def build_source(kind: str, **settings) -> SourceDataModule:
    """The data module reading one source of ``kind`` with its ``settings``."""
    source_class(kind)  # an unknown kind is named
    return SOURCE_KINDS[kind](**settings)
