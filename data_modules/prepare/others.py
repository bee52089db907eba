"""VisA, UCSD Ped2 and BMAD, into the MVTec AD layout.

Layouts relied on:

* **VisA** (https://github.com/amazon-science/spot-diff, ``VisA_20220922.tar``):
  ``<class>/Data/Images/{Normal,Anomaly}/*.JPG``, ``<class>/Data/Masks/Anomaly/*.png`` and the
  split files ``split_csv/{1cls,2cls_highshot,2cls_fewshot}.csv``. The one-class protocol
  (``1cls.csv``) is used: columns ``object,split,label,image,mask`` with ``split`` = train/test,
  ``label`` = normal/anomaly, paths relative to the VisA folder, ``mask`` empty for normal
  images. Masks hold small non-zero values (not 255): non-zero = anomalous. Anomalous test
  images go to ``test/bad`` (the name the VisA preparation script uses).
* **UCSD Ped2** (http://www.svcl.ucsd.edu/projects/anomaly/dataset.htm, ``UCSD_Anomaly_Dataset``):
  ``UCSDped2/Train/TrainNNN/FFF.tif`` (16 clips, normal only), ``UCSDped2/Test/TestNNN/FFF.tif``
  (12 clips) and pixel ground truth for all 12 test clips in ``UCSDped2/Test/TestNNN_gt/FFF.bmp``.
  One class ``pedestrian``; frames become ``TrainNNN_FFF.png`` / ``TestNNN_FFF.png``; a test
  frame whose mask is empty is normal (``test/good``), the others are ``test/anomaly``.
* **BMAD** (https://github.com/DorisBao/BMAD; BrainMRI, LiverCT, RESC):
  ``train/good/img/*.png``, ``{valid,test}/{good,Ungood}/{img,label}/*.png``; a label has the
  name of its image. ``valid`` becomes ``validation``; ``Ungood`` stays the defect type.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.prepare.common import Writer, images_in
from data_modules.types import DataError

VISA_COLUMNS = ("object", "split", "label", "image", "mask")


# --------------------------------------------------------------------------- VisA
def convert_visa(source: Path, writer: Writer) -> None:
    split_file = source / "split_csv" / "1cls.csv"
    if not split_file.is_file():
        raise DataError(f"{split_file} not found: give dataset.source=<the extracted VisA_20220922 folder>, "
                        "which holds split_csv/1cls.csv and one folder per class")
    with split_file.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{split_file} lacks column(s) {missing}; expected {','.join(VISA_COLUMNS)}")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
            raise DataError(f"{split_file} line {line}: split={row['split']!r} label={row['label']!r}; "
                            "expected train/test and normal/anomaly")
        image = source / row["image"]
        anomalous = row["label"] == "anomaly"
        defect = "bad" if anomalous else "good"
        if row["split"] == "train" and anomalous:
            raise DataError(f"{split_file} line {line}: an anomalous training image; use the 1cls split")
        if not image.is_file():
            writer.bad(image, f"listed in {split_file.name} line {line} but absent", "Extract the archive again")
            continue
        written = writer.image(image, row["object"], row["split"], defect, image.stem)
        if written is None or not anomalous:
            continue
        mask = source / row["mask"] if row["mask"] else None
        if mask is None or not mask.is_file():
            writer.unwrite(written[0], row["split"])
            writer.bad(image, f"defect image without its mask ({split_file.name} line {line}: "
                       f"mask={row['mask']!r})", "Restore the mask from the original download")
            continue
        if not writer.mask([mask], written[1], row["object"], "test", defect, image.stem):
            writer.unwrite(written[0], row["split"])


# --------------------------------------------------------------------------- Ped2
def convert_ped2(source: Path, writer: Writer) -> None:
    base = source / "UCSDped2" if (source / "UCSDped2").is_dir() else source
    train, test = base / "Train", base / "Test"
    if not train.is_dir() or not test.is_dir():
        raise DataError(f"{base} holds no Train/ and Test/ folders: give dataset.source=<the folder holding "
                        "UCSDped2> (from UCSD_Anomaly_Dataset.tar.gz)")
    clip = re.compile(r"(Train|Test)\d+$")
    for folder in sorted(d for d in train.iterdir() if d.is_dir() and clip.match(d.name)):
        for frame in images_in(folder, writer.summary):
            writer.image(frame, "pedestrian", "train", "good", f"{folder.name}_{frame.stem}")
    clips = sorted(d for d in test.iterdir() if d.is_dir() and clip.match(d.name))
    if not clips:
        raise DataError(f"{test} holds no TestNNN clip folders; extract the archive again")
    for folder in clips:
        gt_dir = test / f"{folder.name}_gt"
        frames = images_in(folder, writer.summary)
        if not gt_dir.is_dir():
            for frame in frames:
                writer.bad(frame, f"test frame without pixel ground truth ({gt_dir} absent)",
                           "Restore the clip's _gt folder from the original download")
            continue
        for frame in frames:
            stem = f"{folder.name}_{frame.stem}"
            gt = next((gt_dir / f"{frame.stem}{ext}" for ext in (".bmp", ".png", ".tif")
                       if (gt_dir / f"{frame.stem}{ext}").is_file()), None)
            if gt is None:
                writer.bad(frame, f"test frame without its mask (expected {gt_dir / frame.stem}.bmp)",
                           "Restore the mask from the original download")
                continue
            try:
                with Image.open(gt) as img:
                    empty = not np.asarray(img.convert("L")).any()
            except OSError:
                writer.bad(gt, "unreadable mask (corrupt or truncated)", "Replace it from the original download")
                continue
            written = writer.image(frame, "pedestrian", "test", "good" if empty else "anomaly", stem)
            if written is None:
                continue
            if empty:
                writer.summary.conversions["test frame with an empty mask labelled normal"] += 1
            elif not writer.mask([gt], written[1], "pedestrian", "test", "anomaly", stem):
                writer.unwrite(written[0], "test")


# --------------------------------------------------------------------------- BMAD
def convert_bmad(source: Path, writer: Writer, subset: str) -> None:
    base = source / subset if (source / subset).is_dir() else source
    if not (base / "train" / "good" / "img").is_dir():
        raise DataError(f"{base / 'train' / 'good' / 'img'} not found: give dataset.source=<the BMAD {subset} "
                        "folder holding train/, valid/ and test/>")
    for image in images_in(base / "train" / "good" / "img", writer.summary):
        writer.image(image, subset, "train", "good", image.stem)
    for split, target in (("valid", "validation"), ("test", "test")):
        types = sorted(d.name for d in (base / split).iterdir() if d.is_dir()) if (base / split).is_dir() else []
        if not types:
            raise DataError(f"{base / split} holds no good/ or Ungood/ folders; extract the download again")
        for defect in types:
            for image in images_in(base / split / defect / "img", writer.summary):
                written = writer.image(image, subset, target, defect, image.stem)
                if written is None:
                    continue
                if defect == "good":
                    if (base / split / defect / "label").is_dir():
                        writer.summary.conversions["all-zero mask of a normal image not written"] += 1
                    continue
                label = base / split / defect / "label" / image.name
                if not label.is_file():
                    writer.unwrite(written[0], target)
                    writer.bad(image, f"defect image without its mask (expected {label})",
                               "Restore the mask from the original download")
                    continue
                if not writer.mask([label], written[1], subset, target, defect, image.stem):
                    writer.unwrite(written[0], target)
