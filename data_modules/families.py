"""One datamodule per dataset family. After ``mode=prepare`` every family is in the MVTec AD
layout, so loading is the base class's; a family adds its converter (see
:mod:`data_modules.prepare`) and how to get the data. A user's own folder of images is read in
place (:mod:`data_modules.folder`).
"""

from __future__ import annotations

from pathlib import Path

from data_modules.base import AnomalyDataModule
from data_modules.prepare import mvtec, others
from data_modules.prepare.common import Writer


class MVTecADDataModule(AnomalyDataModule):
    """MVTec AD: already in the layout; ``mode=prepare`` checks (and, given a source, links) it."""

    format = "mvtec_ad"

    def convert(self, source: Path, writer: Writer) -> None:
        mvtec.convert_mvtec_ad(source, writer)


class VisaDataModule(AnomalyDataModule):
    """VisA, one-class split (``split_csv/1cls.csv``)."""

    format = "visa"

    def convert(self, source: Path, writer: Writer) -> None:
        others.convert_visa(source, writer)


class MVTecLocoDataModule(AnomalyDataModule):
    """MVTec LOCO AD: logical and structural anomalies as two defect types; own validation split."""

    format = "mvtec_loco"

    def convert(self, source: Path, writer: Writer) -> None:
        mvtec.convert_mvtec_loco(source, writer)


class MVTec3DDataModule(AnomalyDataModule):
    """MVTec 3D-AD: the RGB images; the xyz point clouds are kept under ``<class>/xyz``."""

    format = "mvtec_3d"

    def convert(self, source: Path, writer: Writer) -> None:
        mvtec.convert_mvtec_3d(source, writer)

    def xyz_path(self, image_path: Path) -> Path:
        """The point cloud of a prepared RGB image ``<class>/<split>/<type>/<stem>.png``."""
        image_path = Path(image_path)
        split_dir = image_path.parent.parent
        return split_dir.parent / "xyz" / split_dir.name / image_path.parent.name / f"{image_path.stem}.tiff"


class Ped2DataModule(AnomalyDataModule):
    """UCSD Ped2 frames as one class ``pedestrian``."""

    format = "ped2"

    def convert(self, source: Path, writer: Writer) -> None:
        others.convert_ped2(source, writer)


class BmadDataModule(AnomalyDataModule):
    """One BMAD subset (``subset``: BrainMRI, LiverCT or RESC) as one class; own validation split."""

    format = "bmad"

    def __init__(self, subset: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.subset = subset

    def convert(self, source: Path, writer: Writer) -> None:
        others.convert_bmad(source, writer, self.subset)
