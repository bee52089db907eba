"""The MVTec family: MVTec AD (already in the layout), MVTec LOCO AD and MVTec 3D-AD.

Layouts relied on (as distributed by MVTec, https://www.mvtec.com/company/research/datasets):

* **MVTec AD**: ``<class>/train/good/NNN.png``, ``<class>/test/<type>/NNN.png``,
  ``<class>/ground_truth/<type>/NNN_mask.png``; no masks for ``test/good``. Copied (hard links)
  with every image and mask checked.
* **MVTec LOCO AD**: ``<class>/{train,validation}/good/NNN.png``,
  ``<class>/test/{good,logical_anomalies,structural_anomalies}/NNN.png`` and a *folder* of masks
  per anomalous image, ``<class>/ground_truth/<type>/NNN/000.png, 001.png, ...`` (one per
  annotated defect region; pixel values encode the defect, non-zero = anomalous). The masks
  of an image are merged into one; the two anomaly types stay apart; ``validation`` is kept.
* **MVTec 3D-AD**: ``<class>/{train,validation,test}/<type>/{rgb,xyz,gt}/NNN.{png,tiff,png}``;
  ``train`` and ``validation`` hold ``good`` only, ``test/good`` has all-zero ``gt`` masks
  (not written). The RGB image is used; the organised point cloud ``xyz/NNN.tiff`` is kept
  (hard link) at ``<class>/xyz/<split>/<type>/NNN.tiff``.
"""

from __future__ import annotations

from pathlib import Path

from data_modules.io import list_images
from data_modules.prepare.common import Writer, images_in, link_or_copy
from data_modules.types import DataError


def class_folders(source: Path, marker: str) -> list[Path]:
    """Class folders of a download: sub-folders holding ``marker`` (e.g. ``train``)."""
    if not source.is_dir():
        raise DataError(f"dataset.source={source} not found: give the folder the download was extracted to")
    found = sorted(d for d in source.iterdir() if d.is_dir() and (d / marker).is_dir())
    if not found:
        raise DataError(f"no class folders with a {marker}/ sub-folder under dataset.source={source}: "
                        "give the folder the download was extracted to")
    return found


def _types(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder} not found: the download is incomplete; extract it again")
    return sorted(d for d in folder.iterdir() if d.is_dir())


def convert_mvtec_ad(source: Path, writer: Writer) -> None:
    for class_dir in class_folders(source, "train"):
        name = class_dir.name
        for image in images_in(class_dir / "train" / "good", writer.summary):
            writer.image(image, name, "train", "good", image.stem)
        for type_dir in _types(class_dir / "test"):
            for image in images_in(type_dir, writer.summary):
                written = writer.image(image, name, "test", type_dir.name, image.stem)
                if written is None or type_dir.name == "good":
                    continue
                mask = class_dir / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
                if not mask.is_file():
                    _drop(writer, written[0], image, f"defect image without its mask (expected {mask})")
                    continue
                if not writer.mask([mask], written[1], name, "test", type_dir.name, image.stem):
                    writer.unwrite(written[0], "test")


def _drop(writer: Writer, written: Path, image: Path, reason: str) -> None:
    """Take back the image of a defect image whose mask is missing, then raise or count it."""
    writer.unwrite(written, written.parent.parent.name)  # <class>/<split>/<type>/<file>
    writer.bad(image, reason, "Restore the mask from the original download")


def convert_mvtec_loco(source: Path, writer: Writer) -> None:
    for class_dir in class_folders(source, "train"):
        name = class_dir.name
        for split in ("train", "validation"):
            if split == "validation" and not (class_dir / split).is_dir():
                continue
            for image in images_in(class_dir / split / "good", writer.summary):
                writer.image(image, name, split, "good", image.stem)
        for type_dir in _types(class_dir / "test"):
            for image in images_in(type_dir, writer.summary):
                written = writer.image(image, name, "test", type_dir.name, image.stem)
                if written is None or type_dir.name == "good":
                    continue
                mask_dir = class_dir / "ground_truth" / type_dir.name / image.stem
                masks = list_images(mask_dir) if mask_dir.is_dir() else []
                if not masks:
                    _drop(writer, written[0], image, f"defect image without its masks (expected {mask_dir}/000.png ...)")
                    continue
                if not writer.mask(masks, written[1], name, "test", type_dir.name, image.stem):
                    writer.unwrite(written[0], "test")


def convert_mvtec_3d(source: Path, writer: Writer) -> None:
    summary = writer.summary
    summary.extra["xyz"] = "<class>/xyz/<split>/<type>/<stem>.tiff (organised point clouds, linked from the download)"
    for class_dir in class_folders(source, "train"):
        name = class_dir.name
        for split in ("train", "validation", "test"):
            if split == "validation" and not (class_dir / split).is_dir():
                continue
            for type_dir in _types(class_dir / split):
                defect = type_dir.name
                for image in images_in(type_dir / "rgb", summary):
                    written = writer.image(image, name, split, defect, image.stem)
                    if written is None:
                        continue
                    xyz = type_dir / "xyz" / f"{image.stem}.tiff"
                    if xyz.is_file():
                        target = writer.root / name / "xyz" / split / defect / xyz.name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        link_or_copy(xyz, target)
                        summary.conversions["xyz point cloud kept under <class>/xyz"] += 1
                    else:
                        summary.conversions["rgb image without an xyz point cloud"] += 1
                    if defect == "good":
                        if (type_dir / "gt").is_dir():
                            summary.conversions["all-zero mask of a normal image not written"] += 1
                        continue
                    mask = type_dir / "gt" / f"{image.stem}.png"
                    if not mask.is_file():
                        _drop(writer, written[0], image, f"defect image without its mask (expected {mask})")
                        continue
                    if not writer.mask([mask], written[1], name, split, defect, image.stem):
                        writer.unwrite(written[0], split)


def xyz_path(image_path: Path) -> Path:
    """The point cloud kept for a prepared MVTec 3D-AD RGB image ``<class>/<split>/<type>/<stem>.png``."""
    image_path = Path(image_path)
    split_dir = image_path.parent.parent
    return split_dir.parent / "xyz" / split_dir.name / image_path.parent.name / f"{image_path.stem}.tiff"
