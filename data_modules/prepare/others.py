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
  One class ``pedestrian``; frames become ``TrainNNN_FFF.png`` / ``TestNNN_FFF.png``. A test frame's
  label is the standard frame-level one, from ``UCSDped2/Test/UCSDped2.m`` (one
  ``TestVideoFile{end+1}.gt_frame = [a:b, ...];`` line per clip, in clip order, 1-based frame
  numbers): anomalous frames go to ``test/anomaly`` with their pixel mask, normal ones to
  ``test/good``. Every frame where the ``.m`` file and the mask disagree is reported; without the
  ``.m`` file a frame whose mask is empty is normal (reported too).
* **BMAD** (https://github.com/DorisBao/BMAD; BrainMRI, LiverCT, RESC). A subset's folder holds
  ``train/``, a validation folder (``valid/``, or ``val/`` in RESC's archive) and ``test/``. Training
  images lie in ``train/good/`` (the archives) or ``train/good/img/`` (the README's drawing). The
  evaluation splits hold ``<split>/{good,Ungood}/{img,label}/`` (BrainMRI, RESC, the README) or
  ``<split>/{img,label}/{good,Ungood}/`` (LiverCT's ``hist_DIY``); a label has the name of its image.
  The subset's folder is found below ``dataset.source`` by its ``train/good`` folder; where several
  subsets lie there, by its name (``BrainMRI``/``BraTS2021_slice``, ``LiverCT``/``Liver``/``hist_DIY``,
  ``RESC``). The validation folder becomes ``validation``; ``Ungood`` stays the defect type.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.prepare.common import Writer, images_in
from data_modules.types import DataError

log = logging.getLogger(__name__)

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
GT_FRAME = re.compile(r"gt_frame\s*=\s*\[([^\]]*)\]")
DISAGREEMENTS_LISTED = 20


def read_gt_frames(m_file: Path) -> list[set[int]]:
    """The anomalous frames (1-based) of each test clip, in clip order, from ``UCSDped2.m``."""
    clips = []
    for line_no, line in enumerate(m_file.read_text(errors="replace").splitlines(), start=1):
        line = line.split("%", 1)[0]  # MATLAB comment
        match = GT_FRAME.search(line)
        if match is None:
            continue
        frames: set[int] = set()
        for item in re.split(r"[,\s]+", match.group(1).strip()):
            if not item:
                continue
            bounds = item.split(":")
            if len(bounds) not in (1, 2) or not all(b.strip().isdigit() for b in bounds):
                raise DataError(f"{m_file} line {line_no}: cannot read the frame range {item!r} (expected a:b or a); "
                                "restore the file from UCSD_Anomaly_Dataset.tar.gz")
            first, last = int(bounds[0]), int(bounds[-1])
            frames.update(range(first, last + 1))
        clips.append(frames)
    if not clips:
        raise DataError(f"{m_file} holds no gt_frame lines; restore it from UCSD_Anomaly_Dataset.tar.gz")
    return clips


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
    m_file = test / "UCSDped2.m"
    gt_frames = read_gt_frames(m_file) if m_file.is_file() else None
    if gt_frames is None:
        log.warning("%s not found: a test frame's label comes from whether its pixel mask is empty, not from the "
                    "standard frame-level labels; restore it from UCSD_Anomaly_Dataset.tar.gz", m_file)
    elif len(gt_frames) != len(clips):
        raise DataError(f"{m_file} lists {len(gt_frames)} clips but {test} holds {len(clips)} TestNNN folders; "
                        "extract the archive again")
    writer.summary.extra["frame labels"] = str(m_file) if gt_frames is not None else "pixel masks (no .m file)"
    disagree: list[str] = []
    for index, folder in enumerate(clips):
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
            if gt_frames is None:
                anomalous = not empty
            else:
                number = int(frame.stem) if frame.stem.isdigit() else None
                if number is None:
                    raise DataError(f"{frame}: a test frame's name must be its 1-based number (001.tif) to be "
                                    f"matched with {m_file.name}; restore the clip from the download")
                anomalous = number in gt_frames[index]
                if anomalous == empty:
                    disagree.append(f"{folder.name}/{frame.name}: {m_file.name} says "
                                    f"{'anomalous' if anomalous else 'normal'}, its mask is "
                                    f"{'empty' if empty else 'not empty'}")
            written = writer.image(frame, "pedestrian", "test", "anomaly" if anomalous else "good", stem)
            if written is None:
                continue
            if gt_frames is None and empty:
                writer.summary.conversions["test frame with an empty mask labelled normal"] += 1
            if anomalous and not writer.mask([gt], written[1], "pedestrian", "test", "anomaly", stem):
                writer.unwrite(written[0], "test")
    if disagree:
        writer.summary.conversions[f"test frame labelled by {m_file.name} against its mask"] += len(disagree)
        writer.summary.extra["frames where the .m file and the mask disagree"] = disagree
        log.warning("%d test frames where %s and the pixel masks disagree (labelled by the .m file; all listed in "
                    "the prepared folder's .prepared.json):\n  %s", len(disagree), m_file,
                    "\n  ".join(disagree[:DISAGREEMENTS_LISTED])
                    + (f"\n  ... and {len(disagree) - DISAGREEMENTS_LISTED} more" if len(disagree) > DISAGREEMENTS_LISTED else ""))


# --------------------------------------------------------------------------- BMAD
BMAD_NAMES = {"BrainMRI": ("brainmri", "brats2021_slice"), "LiverCT": ("livert", "liverct", "liver", "hist_diy"),
              "RESC": ("resc",)}  # folder names (lower case) that identify a subset's folder in the archives
BMAD_VALIDATION = ("valid", "val")
BMAD_SEARCH_DEPTH = 4  # Liver/Train/hist_DIY lies three folders below the archive's top


def _bmad_candidates(source: Path) -> list[Path]:
    """Folders at most ``BMAD_SEARCH_DEPTH`` below ``source`` (itself included) holding ``train/good``."""
    found, level = [], [source]
    for _ in range(BMAD_SEARCH_DEPTH + 1):
        found += [d for d in level if (d / "train" / "good").is_dir()]
        level = [c for d in level if not (d / "train" / "good").is_dir()
                 for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    return found


def find_bmad_subset(source: Path, subset: str) -> Path:
    """The folder of BMAD's ``subset`` in ``source`` (the subset's folder or one above it)."""
    if not source.is_dir():
        raise DataError(f"{source} not found: give dataset.source=<the extracted BMAD {subset} download>")
    candidates = _bmad_candidates(source)
    if len(candidates) > 1:  # several subsets (or copies) below: the one whose path names this subset
        names = BMAD_NAMES[subset]
        candidates = [c for c in candidates
                      if any(part.lower() in names for part in c.relative_to(source.parent).parts)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        found = sorted(f"{d.name}/" for d in source.iterdir() if d.is_dir()) or ["nothing"]
        raise DataError(f"no BMAD {subset} folder under {source}: expected a folder holding train/good/ (and "
                        f"valid/ or val/, test/), at most {BMAD_SEARCH_DEPTH} levels down; found: "
                        f"{', '.join(found[:10])}. Give dataset.source=<the extracted {subset} download>")
    raise DataError(f"{len(candidates)} BMAD {subset} folders under {source}: {', '.join(map(str, candidates))}; "
                    "give dataset.source=<the one to convert>")


def _bmad_split(split_dir: Path) -> list[tuple[str, Path, Path]]:
    """``(defect, image folder, label folder)`` of an evaluation split, in either distributed layout."""
    if (split_dir / "img").is_dir():  # LiverCT: <split>/{img,label}/{good,Ungood}
        return [(d.name, d, split_dir / "label" / d.name)
                for d in sorted((split_dir / "img").iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return [(d.name, d / "img", d / "label")  # <split>/{good,Ungood}/{img,label}
            for d in sorted(split_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def convert_bmad(source: Path, writer: Writer, subset: str) -> None:
    base = find_bmad_subset(source, subset)
    writer.summary.extra["subset folder"] = str(base)
    train = base / "train" / "good"
    for image in images_in(train / "img" if (train / "img").is_dir() else train, writer.summary):
        writer.image(image, subset, "train", "good", image.stem)
    validation = next((base / v for v in BMAD_VALIDATION if (base / v).is_dir()), base / BMAD_VALIDATION[0])
    for split_dir, target in ((validation, "validation"), (base / "test", "test")):
        types = _bmad_split(split_dir) if split_dir.is_dir() else []
        if not types:
            found = sorted(d.name for d in base.iterdir() if d.is_dir())
            raise DataError(f"{split_dir} holds no good/ or Ungood/ folders (directly or under img/); {base} holds "
                            f"{', '.join(found) or 'no folders'}. Extract the download again")
        for defect, images, labels in types:
            for image in images_in(images, writer.summary):
                written = writer.image(image, subset, target, defect, image.stem)
                if written is None:
                    continue
                if defect == "good":
                    if labels.is_dir():
                        writer.summary.conversions["all-zero mask of a normal image not written"] += 1
                    continue
                label = labels / image.name
                if not label.is_file():
                    writer.unwrite(written[0], target)
                    writer.bad(image, f"defect image without its mask (expected {label})",
                               "Restore the mask from the original download")
                    continue
                if not writer.mask([label], written[1], subset, target, defect, image.stem):
                    writer.unwrite(written[0], target)
