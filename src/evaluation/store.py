"""Per-image tensors kept in memory up to a budget and in temporary files beyond it."""

from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Streaming many large, short-lived map tensors between small long-lived ones fragments
    glibc's heap: without this the resident memory of an evaluation grows by about the size of
    one batch of maps per batch (measured in BENCHMARKS.md) although nothing is kept.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class MapStore:
    """Append-only rows of named tensors (one chunk per :meth:`append`).

    Chunks stay in memory while their total size is under ``memory_budget_mb``; later chunks are
    written to a temporary folder under ``spill_dir`` (the system's temporary folder when
    ``None``), removed by :meth:`clear` or when the store is garbage-collected.
    """

    def __init__(self, memory_budget_mb: float = 512, spill_dir: str | None = None) -> None:
        self.budget = int(memory_budget_mb * 2**20)
        self.spill_dir = spill_dir
        self._chunks: list[dict[str, Tensor] | Path] = []
        self._starts: list[int] = []
        self._rows = 0
        self._in_memory = 0
        self._folder: Path | None = None
        self._finalizer: weakref.finalize | None = None

    def __len__(self) -> int:
        return self._rows

    def __getstate__(self) -> dict:  # a store travels empty (e.g. to spawned processes)
        state = self.__dict__.copy()
        state.update(_chunks=[], _starts=[], _rows=0, _in_memory=0, _folder=None, _finalizer=None)
        return state

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    @property
    def spilled_chunks(self) -> int:
        return sum(isinstance(c, Path) for c in self._chunks)

    def append(self, **tensors: Tensor) -> int:
        """Store a chunk of rows (all tensors share the first dimension); returns its first row."""
        chunk = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        rows = {v.shape[0] for v in chunk.values()}
        assert len(rows) == 1, f"tensors of one chunk need the same number of rows, got {rows}"
        size = sum(v.numel() * v.element_size() for v in chunk.values())
        start = self._rows
        if self._in_memory + size <= self.budget:
            self._chunks.append(chunk)
            self._in_memory += size
        else:
            path = self._folder_path() / f"chunk_{len(self._chunks):06d}.pt"
            torch.save(chunk, path)
            self._chunks.append(path)
        self._starts.append(start)
        self._rows += rows.pop()
        return start

    def chunks(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``(first row, tensors)`` of every chunk, in order."""
        for start, chunk in zip(self._starts, self._chunks):
            yield start, (torch.load(chunk, weights_only=True) if isinstance(chunk, Path) else chunk)

    def clear(self) -> None:
        self._chunks, self._starts, self._rows, self._in_memory = [], [], 0, 0
        if self._finalizer is not None:
            self._finalizer()
        self._folder, self._finalizer = None, None

    def _folder_path(self) -> Path:
        if self._folder is None:
            if self.spill_dir:
                Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="anomalymoe_maps_", dir=self.spill_dir))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._folder, True)
            log.info("Anomaly maps beyond %d MiB are kept in %s", self.budget // 2**20, self._folder)
        return self._folder
