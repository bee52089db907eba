"""Built-in demo data: a small, deterministic MVTec-layout dataset generated on first use.

Two classes:

* ``fabric`` (texture): a woven pattern; defects ``scratch`` and ``stain``.
* ``widget`` (object made of parts): a board with a red disc, a green square and a blue
  triangle. Structural defect ``crack`` (a crack across one part) and logical anomalies
  ``missing`` (a part is absent), ``extra`` (one part too many) and ``swapped`` (two parts
  exchanged places); the ground truth marks the part areas concerned.

The generator also writes the true part masks of every image (one slot per part type, the
format of :mod:`data_modules.components`) under ``<root>/components_true``, so that component
masks computed by ``mode=segment`` can be checked against them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.components import component_path, save_component_masks
from data_modules.sources.base import Source

log = logging.getLogger(__name__)

DEMO_VERSION = 1
MARKER = ".demo_dataset.json"
MARGIN = 32  # anomalies stay inside the centre crop (pixels of a 192 px image)
TRUE_MASKS = "components_true"  # the true part masks, inside the root
REFERENCE_SIZE = 192  # geometry is written for this size and scaled to the generated one


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _segment_mask(size: int, rng: np.random.Generator, length: tuple[int, int], width: float, centre=None) -> np.ndarray:
    """Pixels within ``width / 2`` of a random segment."""
    yy, xx = _grid(size)
    margin = (MARGIN + 10) * size / REFERENCE_SIZE
    cy, cx = centre if centre is not None else rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, np.pi)
    half = rng.uniform(*length) / 2
    dy, dx = np.sin(angle), np.cos(angle)
    t = np.clip((yy - cy) * dy + (xx - cx) * dx, -half, half)
    dist = np.hypot(yy - (cy + t * dy), xx - (cx + t * dx))
    return dist <= width / 2


# --------------------------------------------------------------------------- fabric
def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    p1, p2, p3 = rng.uniform(0, 2 * np.pi, 3)
    weave = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 9 + p1) * np.sin(2 * np.pi * yy / 9 + p2)
    weave += 0.06 * np.sin(2 * np.pi * (xx + yy) / 23 + p3)
    weave += rng.normal(0, 0.03, (size, size))
    tint = np.array([0.9, 0.78, 0.55]) * rng.uniform(0.95, 1.05)
    return np.clip(weave[..., None] * tint * 1.3, 0, 1)


def _fabric_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    unit = size / REFERENCE_SIZE
    if kind == "scratch":
        mask = _segment_mask(size, rng, (40 * unit, 80 * unit), max(1.5, rng.uniform(2.0, 3.5) * unit))
        img[mask] = rng.choice([0.95, 0.12]) * np.array([1.0, 0.98, 0.92])
        return mask
    yy, xx = _grid(size)  # stain: soft dark ellipse
    margin = (MARGIN + 16) * unit
    cy, cx = rng.uniform(margin, size - margin, 2)
    ry, rx = rng.uniform(8 * unit, 16 * unit, 2)
    r = np.hypot((yy - cy) / ry, (xx - cx) / rx)
    alpha = np.clip(1.5 - r, 0, 1)[..., None] * 0.85
    img[:] = img * (1 - alpha) + np.array([0.35, 0.18, 0.08]) * alpha
    return alpha[..., 0] > 0.25


# --------------------------------------------------------------------------- widget
PARTS = ("disc", "square", "triangle")
PART_COLOURS = {"disc": (0.85, 0.15, 0.15), "square": (0.15, 0.7, 0.2), "triangle": (0.15, 0.25, 0.85)}
# Geometry in pixels of a 192 px image; scaled to the generated size.
PART_CENTRES = {"disc": (62.0, 62.0), "square": (62.0, 130.0), "triangle": (130.0, 96.0)}  # (y, x)
FREE_SPOTS = ((128.0, 50.0), (128.0, 142.0), (60.0, 96.0))


def _part_mask(kind: str, cy: float, cx: float, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    unit = size / REFERENCE_SIZE
    if kind == "disc":
        return np.hypot(yy - cy, xx - cx) <= 17 * unit
    if kind == "square":
        return (np.abs(yy - cy) <= 15 * unit) & (np.abs(xx - cx) <= 15 * unit)
    top, bottom = cy - 18 * unit, cy + 18 * unit
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= (yy - top) * 0.6)


def _board(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    base = 0.58 + 0.05 * (xx / size) + rng.normal(0, 0.015, (size, size))
    return np.clip(base[..., None] * np.array([0.92, 1.0, 0.92]), 0, 1)


def _draw_part(img: np.ndarray, kind: str, cy: float, cx: float) -> np.ndarray:
    mask = _part_mask(kind, cy, cx, img.shape[0])
    yy, xx = _grid(img.shape[0])
    shade = 1 - 0.15 * np.clip(np.hypot(yy - cy, xx - cx) / (20 * img.shape[0] / REFERENCE_SIZE), 0, 1)
    img[mask] = (np.array(PART_COLOURS[kind])[None] * shade[mask][:, None])
    return mask


def _widget(rng: np.random.Generator, size: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A widget image, its ground truth and its true part masks (one slot per part type)."""
    img = _board(rng, size)
    unit = size / REFERENCE_SIZE
    centres = {p: ((c[0] + rng.uniform(-3, 3)) * unit, (c[1] + rng.uniform(-3, 3)) * unit) for p, c in PART_CENTRES.items()}
    gt = np.zeros((size, size), bool)
    parts = {p: np.zeros((size, size), bool) for p in PARTS}
    placed = dict(centres)
    if kind == "missing":
        gone = PARTS[rng.integers(3)]
        gt |= _part_mask(gone, *centres[gone], size)
        del placed[gone]
    elif kind == "swapped":
        a, b = rng.choice(3, 2, replace=False)
        placed[PARTS[a]], placed[PARTS[b]] = centres[PARTS[b]], centres[PARTS[a]]
    for part, (cy, cx) in placed.items():
        parts[part] |= _draw_part(img, part, cy, cx)
    if kind == "swapped":
        gt |= parts[PARTS[a]] | parts[PARTS[b]]
    if kind == "extra":
        part = PARTS[rng.integers(3)]
        cy, cx = FREE_SPOTS[rng.integers(len(FREE_SPOTS))]
        extra = _draw_part(img, part, (cy + rng.uniform(-3, 3)) * unit, (cx + rng.uniform(-3, 3)) * unit)
        parts[part] |= extra
        gt |= extra
    if kind == "crack":
        part = PARTS[rng.integers(3)]
        cy, cx = placed[part]
        crack = _segment_mask(size, rng, (30 * unit, 40 * unit), max(1.5, 2.5 * unit), centre=(cy, cx)) & parts[part]
        img[crack] = 0.08
        gt |= crack
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    return img, gt, np.stack([parts[p] for p in PARTS])


# --------------------------------------------------------------------------- writer
CLASSES = {"fabric": ("scratch", "stain"), "widget": ("crack", "missing", "extra", "swapped")}


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def generate_demo_dataset(
    root: Path, seed: int = 0, size: int = 192, num_train: int = 60, num_test_good: int = 16, num_test_defect: int = 6
) -> bool:
    """Write the demo dataset under ``root`` unless it is already there; True if written."""
    root = Path(root)
    params = dict(version=DEMO_VERSION, seed=seed, size=size, num_train=num_train,
                  num_test_good=num_test_good, num_test_defect=num_test_defect)
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return False
    if root.exists() and any(root.iterdir()):
        if not marker.is_file():
            raise FileExistsError(f"{root} exists and is not a demo dataset; choose another dataset.root")
        shutil.rmtree(root)  # an older demo version: regenerate
    log.info("Generating the demo dataset in %s", root)
    for class_name, defects in CLASSES.items():
        splits = [("train", "good", num_train)] + [("test", "good", num_test_good)]
        splits += [("test", d, num_test_defect) for d in defects]
        for split, kind, count in splits:
            for i in range(count):
                digest = hashlib.sha256(f"{seed}/{class_name}/{split}/{kind}/{i}".encode()).digest()
                rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
                stem = f"{i:03d}"
                if class_name == "fabric":
                    img = _fabric(rng, size)
                    gt = _fabric_defect(img, kind, rng) if kind != "good" else None
                    parts = np.zeros((0, size, size), bool)
                else:
                    img, gt, parts = _widget(rng, size, kind)
                    gt = gt if kind != "good" else None
                _save(root / class_name / split / kind / f"{stem}.png", img)
                if gt is not None:
                    _save(root / class_name / "ground_truth" / kind / f"{stem}_mask.png", gt.astype(np.float32))
                save_component_masks(component_path(root / TRUE_MASKS, class_name, split, kind, stem), parts)
    marker.write_text(json.dumps(params))
    return True


class DemoSource(Source):
    """The demo dataset; generated on first use (``prepare_data``) under ``root``."""

    def __init__(
        self,
        root: str,
        seed: int = 0,
        generate_size: int = 192,
        num_train: int = 60,
        num_test_good: int = 16,
        num_test_defect: int = 6,
        segment_output: str | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "demo")
        super().__init__(root=root, **kwargs)
        # Training reads the generator's true part masks; mode=segment writes its own next to them
        # (dataset.component_masks=<segment_output> trains on those).
        if segment_output and self.component_root is not None and self.component_root.resolve() == (
                self.root / TRUE_MASKS).resolve():
            self.component_folder = Path(segment_output).expanduser()
        self.generate_args = dict(seed=seed, size=generate_size, num_train=num_train,
                                  num_test_good=num_test_good, num_test_defect=num_test_defect)

    def prepare_data(self) -> None:
        generate_demo_dataset(self.root, **self.generate_args)

    def class_names(self) -> list[str]:
        self.prepare_data()  # also when setup() is called directly
        return super().class_names()
