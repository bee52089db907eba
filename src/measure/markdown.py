"""Adding a row to a table of a Markdown file, such as ``BENCHMARKS.md``."""

from __future__ import annotations

from pathlib import Path


def append_row(path: Path, section: str, intro: str, header: str, row: str) -> None:
    """Add ``row`` at the end of the table of ``section`` in the Markdown file ``path`` (the file,
    the section with ``intro`` and the table with ``header`` are created when missing)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if section not in text.splitlines():
        separator = "|---" * (header.count("|") - 1) + "|"
        text = text.rstrip() + f"\n\n{section}\n\n{intro}\n\n{header}\n{separator}\n"
    lines = text.splitlines()
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_row = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_row + 1, row)
    path.write_text("\n".join(lines) + "\n")
