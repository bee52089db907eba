"""Published image counts of each dataset, and the check of a prepared dataset against them.

Sources of the numbers:

* MVTec AD: the dataset paper (Bergmann et al., CVPR 2019 / IJCV 2021), table of the 15
  classes: training images, test images of which good.
* VisA: the one-class split ``split_csv/1cls.csv`` of the release (Zou et al., ECCV 2022):
  training = normal images minus the test normals; every class has 100 anomalous images;
  10,821 images in all (8,659 train, 2,162 test).
* MVTec LOCO AD: Bergmann et al., IJCV 2022, per class train / validation / test good /
  logical / structural (1,772 / 304 / 1,568 in all).
* MVTec 3D-AD: Bergmann et al., VISAPP 2022, per class train / validation / test; their
  sums agree with the published totals (2,656 / 294 / 1,197; 4,147 scans). How many test
  images per class are good could not be confirmed from a text source: not checked.
* UCSD Ped2: the dataset's README and the usual frame counts: 16 training clips (2,550
  frames) and 12 test clips (2,010 frames). How many test frames have an empty mask was not
  found, so only the totals are checked.
* BMAD: the benchmark's table (Bao et al., CVPR workshops 2024) as we read it; these numbers
  could not be re-checked against a text source and are marked unverified: a mismatch is
  reported as a note, not a warning.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_modules.io import list_images


@dataclass(frozen=True)
class Published:
    train: int
    test: int
    test_good: int | None = None
    validation: int | None = None
    verified: bool = True


def _mvtec_ad() -> dict[str, Published]:
    rows = {  # class: (train, test, test good)
        "bottle": (209, 83, 20), "cable": (224, 150, 58), "capsule": (219, 132, 23), "carpet": (280, 117, 28),
        "grid": (264, 78, 21), "hazelnut": (391, 110, 40), "leather": (245, 124, 32), "metal_nut": (220, 115, 22),
        "pill": (267, 167, 26), "screw": (320, 160, 41), "tile": (230, 117, 33), "toothbrush": (60, 42, 12),
        "transistor": (213, 100, 60), "wood": (247, 79, 19), "zipper": (240, 151, 32),
    }
    return {c: Published(t, n, g) for c, (t, n, g) in rows.items()}


def _visa() -> dict[str, Published]:
    rows = {  # class: (train, test good); 100 anomalous test images each
        "candle": (900, 100), "capsules": (542, 60), "cashew": (450, 50), "chewinggum": (453, 50),
        "fryum": (450, 50), "macaroni1": (900, 100), "macaroni2": (900, 100), "pcb1": (904, 100),
        "pcb2": (901, 100), "pcb3": (905, 101), "pcb4": (904, 101), "pipe_fryum": (450, 50),
    }
    return {c: Published(t, g + 100, g) for c, (t, g) in rows.items()}


def _loco() -> dict[str, Published]:
    rows = {  # class: (train, validation, test good, logical, structural)
        "breakfast_box": (351, 62, 102, 83, 90), "juice_bottle": (335, 54, 94, 142, 94),
        "pushpins": (372, 69, 138, 91, 81), "screw_bag": (360, 60, 122, 137, 82),
        "splicing_connectors": (354, 59, 119, 108, 85),
    }
    return {c: Published(t, g + lo + st, g, v) for c, (t, v, g, lo, st) in rows.items()}


def _mvtec_3d() -> dict[str, Published]:
    rows = {  # class: (train, validation, test)
        "bagel": (244, 22, 110), "cable_gland": (223, 23, 108), "carrot": (286, 29, 159), "cookie": (210, 22, 131),
        "dowel": (288, 34, 130), "foam": (236, 27, 100), "peach": (361, 42, 132), "potato": (300, 33, 114),
        "rope": (298, 33, 101), "tire": (210, 29, 112),
    }
    return {c: Published(t, n, validation=v) for c, (t, v, n) in rows.items()}


PUBLISHED: dict[str, dict[str, Published]] = {
    "mvtec_ad": _mvtec_ad(),
    "visa": _visa(),
    "mvtec_loco": _loco(),
    "mvtec_3d": _mvtec_3d(),
    "ped2": {"pedestrian": Published(train=2550, test=2010)},
    "bmad_brain": {"BrainMRI": Published(train=7500, test=3715, test_good=640, validation=83, verified=False)},
    "bmad_liver": {"LiverCT": Published(train=1452, test=1493, test_good=833, validation=166, verified=False)},
    "bmad_resc": {"RESC": Published(train=4297, test=1805, test_good=1041, validation=115, verified=False)},
}


@dataclass
class ClassCounts:
    train: int = 0
    test: Counter = field(default_factory=Counter)  # type -> images
    validation: Counter = field(default_factory=Counter)
    masks: Counter = field(default_factory=Counter)  # "<split>/<type>" -> masks
    missing_masks: list[str] = field(default_factory=list)
    extra_masks: list[str] = field(default_factory=list)


def count_class(class_dir: Path) -> ClassCounts:
    """Images per split and type, masks, defect images without a mask and masks without an image."""
    counts = ClassCounts()
    if (class_dir / "train" / "good").is_dir():
        counts.train = len(list_images(class_dir / "train" / "good"))
    for split, gt_name, store in (("test", "ground_truth", counts.test),
                                  ("validation", "ground_truth_validation", counts.validation)):
        split_dir = class_dir / split
        stems: dict[str, set[str]] = {}
        if split_dir.is_dir():
            for type_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
                images = list_images(type_dir)
                store[type_dir.name] = len(images)
                stems[type_dir.name] = {p.stem for p in images}
        gt_dir = class_dir / gt_name
        if gt_dir.is_dir():
            for type_dir in sorted(d for d in gt_dir.iterdir() if d.is_dir()):
                masks = {p.name[: -len("_mask.png")] for p in type_dir.glob("*_mask.png")}
                counts.masks[f"{split}/{type_dir.name}"] = len(masks)
                known = stems.get(type_dir.name, set())
                counts.extra_masks += [f"{gt_name}/{type_dir.name}/{s}_mask.png" for s in sorted(masks - known)]
        for defect, names in stems.items():
            if defect == "good":
                continue
            have = {p.name[: -len("_mask.png")] for p in (gt_dir / defect).glob("*_mask.png")}
            counts.missing_masks += [f"{split}/{defect}/{s}" for s in sorted(names - have)]
    return counts


@dataclass
class ValidationReport:
    dataset: str
    counts: dict[str, ClassCounts]
    warnings: list[str]
    notes: list[str]

    def lines(self) -> list[str]:
        out = [f"{self.dataset}: {len(self.counts)} classes"]
        for name, c in self.counts.items():
            test = ", ".join(f"{t} {n}" for t, n in sorted(c.test.items()))
            val = f"; validation {sum(c.validation.values())}" if c.validation else ""
            out.append(f"  {name}: train {c.train}; test {sum(c.test.values())} ({test}); "
                       f"masks {sum(c.masks.values())}{val}")
        return out


def validate_prepared(root: Path, dataset: str, published: dict[str, Published] | None = None) -> ValidationReport:
    """Count every class under ``root`` and compare with the published counts of ``dataset``
    (``PUBLISHED[dataset]`` unless given). Mismatches become warnings saying what is missing or
    extra; numbers marked unverified only give notes."""
    root = Path(root)
    table = PUBLISHED.get(dataset, {}) if published is None else published
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "train").is_dir()) if root.is_dir() else []
    counts = {c: count_class(root / c) for c in classes}
    warnings, notes = [], []
    if not table:
        notes.append(f"{dataset}: no published counts to compare with")
    for name in sorted(set(table) - set(counts)):
        warnings.append(f"{dataset}/{name}: class missing (published: {table[name].train} training images)")
    for name in sorted(set(counts) - set(table)) if table else []:
        warnings.append(f"{dataset}/{name}: extra class, not part of the published dataset")
    for name, c in counts.items():
        key = f"{dataset}/{name}"
        for item in c.missing_masks:
            warnings.append(f"{key}: defect image {item} has no mask")
        for item in c.extra_masks:
            warnings.append(f"{key}: mask {item} has no image")
        if name not in table:
            continue
        p = table[name]
        checks = [("training images", c.train, p.train), ("test images", sum(c.test.values()), p.test)]
        if p.test_good is not None:
            checks.append(("good test images", c.test.get("good", 0), p.test_good))
        if p.validation is not None:
            checks.append(("validation images", sum(c.validation.values()), p.validation))
        for what, have, expected in checks:
            if have == expected:
                continue
            diff = f"{expected - have} missing" if have < expected else f"{have - expected} extra"
            text = f"{key}: {have} {what}, published {expected} ({diff})"
            (warnings if p.verified else notes).append(text + ("" if p.verified else "; published number unverified"))
    return ValidationReport(dataset, counts, warnings, notes)
