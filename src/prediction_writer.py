"""What ``mode=predict`` leaves on disk, written so that a killed prediction loses nothing and
continues where it stopped.

``predictions.partial.jsonl`` is the progress file: a first line describing the prediction
(checkpoint, input, class key), then one JSON line per image (its score, decision, routing and
heat map, or why it could not be read), appended and flushed after every batch. Heat maps are
written to a temporary file in their folder and renamed into place, so none is ever cut short.
While the progress file exists the folder holds an unfinished prediction; running the same
command again scores only the images not in it. At the end ``predictions.json`` is written
(atomically) from it and the progress file is removed.

A finished prediction is never rewritten: a folder that holds ``predictions.json`` (or heat maps
without a progress file) is refused, and a resumed prediction must have the same description,
the checkpoint's SHA-256 included (the same path holding other weights would mix two models).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from src.errors import ConfigError

log = logging.getLogger(__name__)

PARTIAL = "predictions.partial.jsonl"
FINAL = "predictions.json"
HEATMAPS = "heatmaps"


def unfinished_prediction(output_dir: str | Path) -> bool:
    """True when ``output_dir`` holds a prediction that was stopped before it finished."""
    return (Path(output_dir) / PARTIAL).is_file()


def refuse_finished(output_dir: str | Path) -> None:
    """A :class:`ConfigError` when ``output_dir`` holds a finished prediction (or its heat maps)
    and no progress file: nothing may delete or rewrite it."""
    out = Path(output_dir)
    if (out / PARTIAL).is_file():
        return
    done = [n for n in (FINAL, "predictions.csv") if (out / n).exists()]
    done += [HEATMAPS] if (out / HEATMAPS).is_dir() and any((out / HEATMAPS).iterdir()) else []
    if done:
        raise ConfigError(f"predict.output_dir={out} holds a finished prediction ({', '.join(done)}): choose another "
                          "predict.output_dir (the default is <paths.output_dir>/predictions of a new run), or "
                          "delete it")


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def relative_path(path: Path, root: Path) -> Path:
    """``path`` relative to the input folder ``root`` (its name alone when ``root`` is a file)."""
    return path.relative_to(root) if root.is_dir() and path.is_relative_to(root) else Path(path.name)


class PredictionWriter:
    """Opens (or resumes) a prediction folder, records each batch's results as they come, writes
    heat maps atomically and finally ``predictions.json``.

    Args:
        output_dir: ``predict.output_dir``.
        root: ``predict.input`` (heat-map names are its images' relative paths).
        describe: what identifies the prediction (checkpoint, input, class key): a resumed
            prediction must have the same, else its scores would be mixed with others.
    """

    def __init__(self, output_dir: Path, root: Path, describe: dict) -> None:
        self.out, self.root = Path(output_dir), root
        self.out.mkdir(parents=True, exist_ok=True)
        self.heat_dir = self.out / HEATMAPS
        self.partial = self.out / PARTIAL
        self.rows: dict[str, dict] = {}  # input path -> its row (scored, or an error)
        if self.partial.is_file():
            self._resume(describe)
        else:
            refuse_finished(self.out)
            self.partial.write_text(json.dumps({"prediction": describe}) + "\n")
        self.used = {Path(r["heatmap"]).name for r in self.rows.values() if r.get("heatmap")}
        for stale in self.heat_dir.glob(".*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        self._file = open(self.partial, "a")

    def _resume(self, describe: dict) -> None:
        lines = self.partial.read_text().splitlines()
        header = json.loads(lines[0]).get("prediction") if lines else None
        if header != describe:
            differ = [f"{k}={header.get(k)!r}" for k in describe if header and header.get(k) != describe[k]]
            changed = (" (the checkpoint's content differs from the one it started with, whatever its path)"
                       if header and header.get("checkpoint_sha256") != describe.get("checkpoint_sha256") else "")
            raise ConfigError(
                f"{self.out} holds an unfinished prediction of other settings ({', '.join(differ) or 'unreadable'})"
                f"{changed}: "
                "run it again with those settings to finish it, choose another paths.output_dir (or "
                "predict.output_dir), or start afresh with overwrite=true")
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except ValueError:  # the last line, cut short by a kill: that image is scored again
                continue
            self.rows[row["path"]] = row
        log.info("Resuming the unfinished prediction in %s: %d image(s) already done", self.out, len(self.rows))

    def todo(self, images: Sequence[Path]) -> list[Path]:
        """The images not scored (nor found unreadable) yet."""
        return [p for p in images if str(p) not in self.rows]

    def heatmap(self, image: Image.Image, path: Path) -> str:
        """Write ``image`` as the heat map of input ``path``; returns its name relative to the folder."""
        name = "__".join(relative_path(Path(path), self.root).with_suffix("").parts)
        candidate, i = f"{name}.png", 1
        while candidate in self.used:
            candidate, i = f"{name}_{i}.png", i + 1
        self.used.add(candidate)
        self.heat_dir.mkdir(exist_ok=True)
        write_atomically(self.heat_dir / candidate, lambda tmp: image.save(tmp, format="PNG"))
        return f"{HEATMAPS}/{candidate}"

    def add(self, rows: Iterable[dict]) -> None:
        """Record one batch's rows (each with ``path``; an unreadable image's with ``error``)."""
        for row in rows:
            self.rows[row["path"]] = row
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def results(self, images: Sequence[Path]) -> tuple[list[dict], list[dict]]:
        """(scored rows, error rows) in the order of ``images``."""
        rows = [self.rows[str(p)] for p in images if str(p) in self.rows]
        return [r for r in rows if "error" not in r], [r for r in rows if "error" in r]

    def finish(self, summary: dict) -> Path:
        """Write ``predictions.json`` and remove the progress file: the folder is complete."""
        self._file.close()
        path = self.out / FINAL
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        self.partial.unlink()
        return path

    def close(self) -> None:
        self._file.close()
