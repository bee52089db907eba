"""What every converter shares: checked image and mask writing, and the conversion summary.

Conversions applied to inputs (each counted in :class:`PrepareSummary.conversions`):

* PNG, JPEG and BMP images are hard-linked (copied when linking is not possible) unchanged, so
  a prepared image takes no extra space (and is the same file as the download's);
  grayscale, palette and 16-bit images stay as they are (the loader turns them into 8-bit RGB,
  16-bit by the fixed factor 255 / 65535).
* TIFF images (and any other format Pillow reads) are re-encoded losslessly as PNG; 32-bit
  integer images holding 16-bit values become 16-bit PNG; float images are refused (their
  value range is not defined).
* Masks are written as 8-bit PNG ``<stem>_mask.png``: 255 where any input mask is non-zero
  (several masks of one image, as in MVTec LOCO, are merged), 0 elsewhere.
* Sizes are compared upright: an image's EXIF orientation is applied, as the loader applies it
  (:func:`data_modules.io.open_image`).
* A mask whose size differs from its image's is resized to the image with nearest-neighbour
  interpolation when the aspect ratios agree (within 1 %); otherwise it is an error.

Unreadable (corrupt, truncated) images and defect images without a mask stop the conversion
with a :class:`~data_modules.types.DataError` naming the file; with ``skip_bad=True`` they are
left out instead, and listed in the summary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_modules.io import DEFAULT_MAX_PIXELS, check_image_header, header_problem, oriented_size
from data_modules.types import IMAGE_EXTENSIONS, DataError

log = logging.getLogger(__name__)

MARKER = ".prepared.json"
KEPT_FORMATS = (".png", ".jpg", ".jpeg", ".bmp")  # linked unchanged; anything else becomes PNG
MARKER_VERSION = 1


@dataclass
class PrepareSummary:
    """What a conversion wrote, converted and left out."""

    dataset: str
    source: str
    images: Counter = field(default_factory=Counter)  # "<split>" -> images written
    masks: int = 0
    conversions: Counter = field(default_factory=Counter)  # description -> count
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    extra: dict = field(default_factory=dict)  # family-specific facts (e.g. where xyz maps went)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "source": self.source, "images": dict(self.images), "masks": self.masks,
                "conversions": dict(self.conversions), "skipped": [list(s) for s in self.skipped], "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict) -> PrepareSummary:
        return cls(data["dataset"], data["source"], Counter(data["images"]), data["masks"],
                   Counter(data["conversions"]), [tuple(s) for s in data["skipped"]], data.get("extra", {}))

    def lines(self) -> list[str]:
        out = [f"{self.dataset}: wrote " + ", ".join(f"{n} {split} images" for split, n in sorted(self.images.items()))
               + f" and {self.masks} masks (from {self.source})"]
        out += [f"  converted: {what}: {n}" for what, n in sorted(self.conversions.items())]
        if self.skipped:
            reasons = Counter(reason for _, reason in self.skipped)
            out += [f"  skipped on purpose: {reason}: {n}" for reason, n in sorted(reasons.items())]
            out += [f"    {path}" for path, _ in self.skipped[:20]]
            if len(self.skipped) > 20:
                out.append(f"    ... and {len(self.skipped) - 20} more (all listed in {MARKER})")
        return out


class TooLarge(DataError):
    """An input above ``dataset.max_image_pixels`` (what is wrong, the fix)."""


def _read(path: Path, max_pixels: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:  # refused before decoding (float images: _to_png_mode)
                raise TooLarge(*header_problem(img, max_pixels))
            img.load()  # decodes everything: truncated files fail here
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def _to_png_mode(img: Image.Image, path: Path) -> Image.Image:
    """Modes PNG can hold. 32-bit integer images holding 16-bit values become 16-bit; float
    images, whose value range is not defined, are refused (like the loader does)."""
    if img.mode == "F":
        check_image_header(img, path)  # raises, naming the file and the fix
    if img.mode == "I":
        array = np.asarray(img)
        if array.min() < 0 or array.max() > 65535:
            raise DataError(f"image {path} holds 32-bit values outside 0..65535: save it as an 8-bit or 16-bit image")
        return Image.fromarray(array.astype(np.uint16))
    if img.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L"):
        return img
    return img.convert("RGB")


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class Writer:
    """Writes images and masks into ``root`` in the MVTec AD layout, checking every file.

    Args:
        root: the prepared dataset (``<root>/<class>/...``).
        summary: where counts, conversions and skipped files are recorded.
        skip_bad: leave unreadable images and defect images without a mask out (counted)
            instead of stopping with an error.
        max_pixels: inputs with more pixels are refused before decoding (``dataset.max_image_pixels``).
    """

    def __init__(self, root: Path, summary: PrepareSummary, skip_bad: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root, self.summary, self.skip_bad, self.max_pixels = root, summary, skip_bad, max_pixels

    def bad(self, path: Path, reason: str, fix: str) -> None:
        """An input that cannot be used: an error, or a counted skip with ``skip_bad``."""
        if not self.skip_bad:
            raise DataError(f"{path}: {reason}. {fix}, or set dataset.skip_bad=true to leave it out (it is counted).")
        self.summary.skipped.append((str(path), reason))

    def image(self, src: Path, class_name: str, split: str, defect: str, stem: str) -> tuple[Path, tuple[int, int]] | None:
        """Check ``src`` and write it as ``<class>/<split>/<defect>/<stem><ext>``; returns the
        written path and the image's (width, height) upright, as the loader reads it (its EXIF
        orientation applied: :func:`data_modules.io.oriented_size`), or None when skipped."""
        try:
            img = _read(src, self.max_pixels)
        except TooLarge as err:
            self.bad(src, err.args[0], err.args[1].capitalize())
            return None
        except DataError as err:
            self.bad(src, "unreadable image (corrupt or truncated)", "Replace it from the original download")
            log.debug("%s", err)
            return None
        folder = self.root / class_name / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        if src.suffix.lower() in KEPT_FORMATS:
            dst = folder / f"{stem}{src.suffix}"
            link_or_copy(src, dst)
        else:
            dst = folder / f"{stem}.png"
            _to_png_mode(img, src).save(dst)
            self.summary.conversions[f"{src.suffix.lower() or 'unknown format'} image re-encoded as PNG"] += 1
        self.summary.images[split] += 1
        return dst, oriented_size(img)

    def unwrite(self, path: Path, split: str) -> None:
        """Take back an image written by :meth:`image` (its mask turned out to be unusable)."""
        path.unlink()
        self.summary.images[split] -= 1

    def mask(self, sources: list[Path], image_size: tuple[int, int], class_name: str, split: str, defect: str,
             stem: str) -> bool:
        """Merge ``sources`` (non-zero = anomalous) into ``ground_truth[_validation]/<defect>/<stem>_mask.png``,
        fitted to the image's (width, height). Returns False when a source is unreadable and skipped."""
        merged = None
        for path in sources:
            try:
                img = _read(path, self.max_pixels)
            except TooLarge as err:
                self.bad(path, err.args[0], err.args[1].capitalize())
                return False
            except DataError:
                self.bad(path, "unreadable mask (corrupt or truncated)", "Replace it from the original download")
                return False
            img = ImageOps.exif_transpose(img)  # a mask is read upright like its image
            if img.mode not in ("1", "L", "I", "F") and not img.mode.startswith("I;16"):
                img = img.convert("L")  # colour or palette masks: anything not black is marked
            array = np.asarray(img) > 0
            if array.shape[::-1] != tuple(image_size):
                array = self._fit(array, image_size, path)
            merged = array if merged is None else merged | array
        if len(sources) > 1:
            self.summary.conversions["masks of one image merged into one"] += len(sources)
        gt = "ground_truth" if split == "test" else f"ground_truth_{split}"
        dst = self.root / class_name / gt / defect / f"{stem}_mask.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(merged.astype(np.uint8) * 255).save(dst)
        self.summary.masks += 1
        return True

    def _fit(self, array: np.ndarray, image_size: tuple[int, int], path: Path) -> np.ndarray:
        (w, h), (mh, mw) = image_size, array.shape
        if abs(mw / mh - w / h) > 0.01 * (w / h):
            raise DataError(
                f"mask {path} is {mw}x{mh} but its image is {w}x{h} once its EXIF orientation is applied, as every "
                "loader reads it (another aspect ratio): the mask belongs to "
                "another image or was cropped. Replace it from the original download."
            )
        self.summary.conversions["mask resized to its image (nearest)"] += 1
        return np.asarray(Image.fromarray(array).resize((w, h), Image.NEAREST))


def images_in(folder: Path, summary: PrepareSummary | None = None) -> list[Path]:
    """Image files of ``folder``, sorted; an empty or absent folder is an error. Hidden files
    (``._001.tif`` left by macOS archives) are not images: counted in ``summary`` and ignored."""
    if not folder.is_dir():
        raise DataError(f"{folder} not found")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    hidden = [p for p in files if p.name.startswith(".")]
    if hidden and summary is not None:
        summary.conversions["hidden files (._*) ignored"] += len(hidden)
    images = sorted(p for p in files if not p.name.startswith("."))
    if not images:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); restore it from the download "
                        "or remove the folder")
    return images


def read_marker(root: Path) -> dict | None:
    path = root / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def write_marker(root: Path, fmt: str, summary: PrepareSummary) -> None:
    (root / MARKER).write_text(json.dumps({"version": MARKER_VERSION, "format": fmt, **summary.to_json()}, indent=1))
