"""Reading images from disk: listing them, checking a header before decoding, opening them
upright and in a defined value range.

Every image this project reads is opened here, with the pixel limit it is given
(``dataset.max_image_pixels``, carried by the objects that read images, such as
:class:`data_modules.dataset.AnomalyDataset`, into every loader worker whatever its start
method). Pillow's own process-wide limit is turned off where this module is imported: it would
stop at twice its default before this module could name the file and the setting, and would
not follow a raised limit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from data_modules.types import IMAGE_EXTENSIONS, DataError

# Pixels above which an image is refused unless a limit is given (Pillow's own default).
DEFAULT_MAX_PIXELS = 89_478_485
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")

Image.MAX_IMAGE_PIXELS = None  # replaced by the limit each call below is given (module docstring)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity; cgroup-limited containers report theirs)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def pixel_limit(limit: int | None) -> int:
    """``dataset.max_image_pixels`` as a number (None: :data:`DEFAULT_MAX_PIXELS`)."""
    return int(limit) if limit else DEFAULT_MAX_PIXELS


def header_problem(img: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str] | None:
    """(what is wrong, the fix) when an image's size or pixel format is one the loader refuses."""
    if img.width * img.height > max_pixels:
        return (f"is {img.width}x{img.height} ({img.width * img.height / 1e6:.1f} MP), above "
                f"dataset.max_image_pixels={max_pixels}",
                "downscale it, or raise the limit (dataset.max_image_pixels=<pixels>) if it is meant to be that large")
    if img.mode == "F":
        return ("holds 32-bit floats (mode F), whose value range is not defined",
                "save it as an 8-bit or 16-bit image (e.g. values in [0, 1] times 65535 as a 16-bit PNG)")
    return None


def check_image_header(img: Image.Image, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise a :class:`DataError` naming ``path`` when :func:`header_problem` finds one."""
    problem = header_problem(img, max_pixels)
    if problem is not None:
        raise DataError(f"image {path} {problem[0]}: {problem[1]}")


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` once its EXIF orientation is applied (:func:`open_image`)."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else img.size


def open_image(path: Path, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as ``mode``, upright: its EXIF orientation (a camera's "rotate 90°") is
    applied, like an image viewer does, in training, test and predict alike.

    Grayscale, palette and RGBA images are converted. 16-bit images (and 32-bit integer images
    holding 16-bit values) are scaled by the fixed factor 255 / 65535, never by each image's own
    range, so that a brighter or darker image stays brighter or darker. Float images and images
    above ``max_pixels`` are refused, before any pixel is decoded, with a :class:`DataError`
    naming the file.
    """
    try:
        with Image.open(path) as img:
            check_image_header(img, path, max_pixels)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
            if img.mode in SIXTEEN_BIT_MODES and mode in ("RGB", "L"):
                array = np.asarray(img, dtype=np.int64)
                if array.min() < 0 or array.max() > 65535:
                    raise DataError(f"image {path} holds 32-bit values outside 0..65535 ({array.min()}..{array.max()}): "
                                    "save it as an 8-bit or 16-bit image")
                img = Image.fromarray(np.round(array * (255 / 65535)).astype(np.uint8))
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or remove the file.") from err
