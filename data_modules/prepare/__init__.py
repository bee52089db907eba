"""Converting downloads into the MVTec AD layout (``python run.py mode=prepare``) and checking them.

:func:`prepare_dataset` converts one dataset from its download folder (``source``) into its
``root``, atomically (into a temporary sibling folder, renamed at the end), records what it did
in ``<root>/.prepared.json`` and validates the result against the published counts. A second
run finds the record and does nothing. Without a ``source`` the ``root`` is validated as found
(MVTec AD, or any dataset the user already arranged in the layout).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_modules.io import DEFAULT_MAX_PIXELS
from data_modules.prepare.common import PrepareSummary, Writer, read_marker, write_marker
from data_modules.prepare.counts import PUBLISHED, Published, ValidationReport, validate_prepared
from data_modules.types import DataError

log = logging.getLogger(__name__)

Converter = Callable[[Path, Writer], None]

__all__ = ["PUBLISHED", "PrepareResult", "PrepareSummary", "prepare_dataset", "validate_prepared"]


@dataclass
class PrepareResult:
    name: str
    root: Path
    status: str  # "converted", "already prepared" or "validated in place"
    summary: PrepareSummary | None
    validation: ValidationReport

    def lines(self) -> list[str]:
        out = [f"{self.name}: {self.status} ({self.root})"]
        if self.summary is not None:
            out += ["  " + line for line in self.summary.lines()]
        out += ["  " + line for line in self.validation.lines()]
        out += [f"  WARNING {w}" for w in self.validation.warnings]
        out += [f"  note: {n}" for n in self.validation.notes]
        return out


def prepare_dataset(name: str, root: Path, source: Path | str | None, convert: Converter | None, fmt: str,
                    skip_bad: bool = False, published: dict[str, Published] | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> PrepareResult:
    """Convert ``source`` into ``root`` with ``convert`` (unless done before), then validate.

    Args:
        name: dataset name (reports, published counts).
        root: where the MVTec-layout dataset goes.
        source: the extracted download; None validates ``root`` as it is.
        convert: the family's converter, ``convert(source, writer)``.
        fmt: the family's format name, recorded with the conversion.
        skip_bad: leave unusable inputs out (counted) instead of stopping.
        published: counts to compare with (default ``PUBLISHED[name]``).
        max_pixels: inputs with more pixels are refused (``dataset.max_image_pixels``).
    """
    root = Path(root).expanduser()
    marker = read_marker(root)
    if marker is not None:
        summary = PrepareSummary.from_json(marker)
        log.info("%s: already prepared in %s from %s; nothing to do (delete the folder to convert again)",
                 name, root, marker["source"])
        status = "already prepared, nothing done"
    elif source is None:
        if not root.is_dir():
            raise DataError(f"dataset '{name}' not found at {root}: convert the download with `python run.py "
                            f"mode=prepare dataset={name} dataset.source=<download folder>`")
        summary, status = None, "validated in place (no dataset.source given)"
    else:
        source = Path(source).expanduser().resolve()
        if convert is None:
            raise DataError(f"dataset '{name}' has no converter; arrange it in the MVTec AD layout under {root}")
        if root.exists() and any(root.iterdir()):
            raise DataError(f"{root} is not empty and was not written by mode=prepare: choose an empty "
                            "dataset.root, or leave dataset.source unset to validate it as it is")
        summary = PrepareSummary(name, str(source))
        partial = root.parent / f".{root.name}.partial"
        if partial.exists():
            shutil.rmtree(partial)  # left by an interrupted conversion
        partial.mkdir(parents=True)
        try:
            convert(source, Writer(partial, summary, skip_bad, max_pixels))
            write_marker(partial, fmt, summary)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if root.exists():
            root.rmdir()
        partial.rename(root)
        status = "converted"
    report = validate_prepared(root, name, published)
    result = PrepareResult(name, root, status, summary, report)
    for line in result.lines():
        (log.warning if "WARNING" in line else log.info)("%s", line)
    return result
