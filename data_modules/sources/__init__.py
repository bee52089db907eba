"""The kinds of dataset source: ``dataset.sources.<name>.kind`` names how a source is read.

Every downloaded dataset is converted into the MVTec AD layout by ``mode=prepare`` (its
converter in :data:`~data_modules.sources.prepared.CONVERTERS`) and then read the same way
(:class:`~data_modules.sources.prepared.PreparedSource`); the built-in demo is generated on
first use; a user's own folder is read in place. A new kind is a :class:`Source` subclass in a
module of this package and one entry of :data:`SOURCE_KINDS`.

========== =================================================================================
kind        what it is
========== =================================================================================
mvtec_ad    MVTec AD: already in the layout; ``mode=prepare`` checks (and, given a source, links) it
visa        VisA, one-class split (``split_csv/1cls.csv``)
mvtec_loco  MVTec LOCO AD: logical and structural anomalies as two defect types; own validation split
mvtec_3d    MVTec 3D-AD: the RGB images; the xyz point clouds kept under ``<class>/xyz``
ped2        UCSD Ped2 frames as one class ``pedestrian``
bmad        one BMAD subset (``subset``: BrainMRI, LiverCT or RESC) as one class; own validation split
demo        the built-in synthetic data (:mod:`data_modules.sources.demo`)
folder      a user's own images, read in place (:mod:`data_modules.sources.folder`)
========== =================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from data_modules.sources.base import Source
from data_modules.sources.demo import DemoSource
from data_modules.sources.folder import FolderSource
from data_modules.sources.prepared import CONVERTERS, PreparedSource
from data_modules.types import DataError

SOURCE_KINDS: dict[str, Callable[..., Source]] = {
    **{kind: partial(PreparedSource, kind) for kind in CONVERTERS},
    "demo": DemoSource,
    "folder": FolderSource,
}


def source_class(kind: str) -> type[Source]:
    """The class of a source ``kind``."""
    if kind not in SOURCE_KINDS:
        raise DataError(f"dataset.sources.<name>.kind={kind!r} is not a source kind; use one of {sorted(SOURCE_KINDS)}")
    factory = SOURCE_KINDS[kind]
    return factory.func if isinstance(factory, partial) else factory


def build_source(kind: str, **settings) -> Source:
    """The source of ``kind`` with its ``settings``."""
    source_class(kind)  # an unknown kind is named
    return SOURCE_KINDS[kind](**settings)
