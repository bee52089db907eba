"""Checking every image and mask of a run's splits before the first training step.

:func:`validate_samples` reads the header of every image and mask and runs Pillow's ``verify``
(the checksums of a PNG's chunks, which finds truncated PNG files; no pixel decoding: about a
millisecond per file, see ``benchmarks/validation.py``) and collects every problem with its
file and fix; :func:`raise_problems` turns them into one :class:`~data_modules.types.DataError`.
Checked: the image decodes and its pixel format and size are ones the loader takes
(:func:`~data_modules.io.header_problem`, with the run's pixel limit; sizes after the EXIF orientation), an anomalous
image's mask exists, decodes and has the image's size, no two images of a class, split and type
share a stem (their masks and component-mask files are found by name), and, when component
masks are read, each image's mask file exists and reads as the loader reads it (every member,
the masks' size).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_modules.components import component_path, read_component_masks
from data_modules.io import DEFAULT_MAX_PIXELS, available_cpus, header_problem, oriented_size
from data_modules.types import DataError, Sample

log = logging.getLogger(__name__)

SHOWN = 30  # problems listed in the error; the rest are counted


@dataclass(frozen=True)
class Problem:
    path: Path
    what: str
    fix: str

    def line(self, root: Path | None = None) -> str:
        return f"{_short(self.path, root)}: {self.what}. Fix: {self.fix}"


def _short(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def _header(path: Path, max_pixels: int) -> tuple[tuple[int, int] | None, tuple[str, str] | None]:
    """((width, height) as the loader sees it, None) or (None, (why the file cannot be used, the fix))."""
    try:
        with Image.open(path) as img:
            problem = header_problem(img, max_pixels)
            if problem is None:
                img.load()  # every pixel decoded, as the loader will: finds truncated JPEG and PNG files
            return oriented_size(img), problem
    except FileNotFoundError:
        return None, ("file not found", "")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return None, (f"not a readable image ({err})", "replace or remove the file")


def _sample_problems(sample: Sample, component_root: Path | None, max_pixels: int) -> list[Problem]:
    """The problems of one sample: its image, its mask and its component masks."""
    problems: list[Problem] = []
    size, why = _header(sample.image_path, max_pixels)
    if why is not None:
        return [Problem(sample.image_path, why[0], why[1] or "restore the file or remove it from the list")]
    if sample.mask_path is not None:
        mask_size, why = _header(sample.mask_path, max_pixels)
        if why is not None and why[0] == "file not found":
            problems.append(Problem(sample.image_path, f"anomalous image without its mask (expected {sample.mask_path})",
                                    "add the mask, or move the image out of the dataset"))
        elif why is not None:
            problems.append(Problem(sample.mask_path, f"unusable mask ({why[0]})", "replace the mask"))
        elif mask_size != size:
            problems.append(Problem(sample.mask_path, f"mask is {mask_size[0]}x{mask_size[1]} but its image "
                                    f"{sample.image_path} is {size[0]}x{size[1]}",
                                    "replace the mask, or convert the dataset with mode=prepare (which resizes "
                                    "masks of the same aspect ratio)"))
    if component_root is not None:
        path = component_path(component_root, sample.class_name, sample.split, sample.defect_type, sample.image_path.stem)
        if not path.is_file():
            problems.append(Problem(sample.image_path, f"no component masks (expected {path})",
                                    f"compute them with `python run.py mode=segment dataset={sample.dataset}`, or "
                                    "set dataset.component_masks=null to train without component masks"))
        else:
            fix = "delete it and run mode=segment again"
            try:  # what the loader reads: every member
                shape = read_component_masks(path).shape  # (K, H, W)
            except DataError as err:
                cause = err.__cause__
                problems.append(Problem(path, f"unreadable component mask file ({type(cause).__name__}: {cause})", fix))
                return problems
            if shape[1:] != (size[1], size[0]):
                problems.append(Problem(path, f"component masks are {shape[2]}x{shape[1]} but the image "
                                        f"{sample.image_path} is {size[0]}x{size[1]}", fix))
    return problems


def validate_samples(
    samples: Sequence[Sample],
    component_roots: Mapping[str, Path | None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Problem]:
    """Every problem of ``samples`` (see the module docstring); ``component_roots`` maps a
    dataset name to the folder its component masks are read from (None: none); images above
    ``max_pixels`` are refused."""
    problems: list[Problem] = []
    seen: dict[tuple, Path] = {}
    roots = dict(component_roots or {})
    for name, root in roots.items():
        if root is not None and not Path(root).is_dir():
            problems.append(Problem(Path(root), f"component masks folder of dataset {name} not found",
                                    f"compute them with `python run.py mode=segment dataset={name}`, or set "
                                    "dataset.component_masks=null to train without component masks"))
            roots[name] = None
    checks: list[Sample | Problem] = []  # each sample to check, or its duplicate-name problem
    for sample in samples:
        key = (sample.dataset, sample.class_name, sample.split, sample.defect_type, sample.image_path.stem)
        if key in seen:
            checks.append(Problem(sample.image_path, f"same name as {seen[key]} up to the extension",
                                  "rename or remove one of them (masks and component masks are found by name)"))
        else:
            seen[key] = sample.image_path
            checks.append(sample)

    def check(item: Sample | Problem) -> list[Problem]:
        return [item] if isinstance(item, Problem) else _sample_problems(item, roots.get(item.dataset), max_pixels)

    # Decoding is most of the cost and Pillow releases the GIL while it decodes: one thread per CPU.
    with ThreadPoolExecutor(max_workers=min(8, available_cpus())) as pool:
        for found in pool.map(check, checks):
            problems += found
    return problems


def raise_problems(problems: Sequence[Problem], what: str, roots: Mapping[str, Path] | None = None) -> None:
    """One :class:`DataError` listing ``problems`` (paths relative to a dataset root where possible)."""
    if not problems:
        return
    root_list = [Path(r) for r in (roots or {}).values()]

    def root_of(path: Path) -> Path | None:
        return next((r for r in root_list if path.is_relative_to(r)), None)

    def line(problem: Problem) -> str:
        text = problem.line(root_of(problem.path))
        for root in root_list:
            text = text.replace(f"{root}/", "")
        return f"  {text}"

    lines = [line(p) for p in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  ... and {len(problems) - SHOWN} more")
    where = f" (under {', '.join(map(str, root_list))})" if root_list else ""
    raise DataError(f"{len(problems)} problem(s) in {what}{where}, found before training:\n" + "\n".join(lines))
