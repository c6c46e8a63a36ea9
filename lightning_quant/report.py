"""Tables a run leaves for people: the same rows as CSV (for tools), Markdown (to read) and a PNG chart."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_quant.files import atomic_write


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: ``None`` cells are empty, ``|`` is escaped and a line break becomes a space.

    Example::

        >>> print(markdown_table(["layer", "note"], [["net.0", None], ["net.1", "a|b"]]), end="")
        | layer | note |
        | --- | --- |
        | net.0 |  |
        | net.1 | a\\|b |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = (str(c if c is not None else "").replace("|", "\\|").replace("\n", " ") for c in row)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    dirpath: str | Path,
    stem: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    markdown: str,
    png: bytes,
) -> dict[str, Path]:
    """Write ``<stem>.csv`` (``columns`` of ``rows``; other keys are left out), ``<stem>.md`` (``markdown``)
    and ``<stem>.png`` (``png``) into ``dirpath``, each atomically; return their paths by suffix."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {}
    for suffix, data in (("csv", text.getvalue()), ("md", markdown), ("png", png)):
        paths[suffix] = Path(dirpath) / f"{stem}.{suffix}"
        atomic_write(paths[suffix], data)
    return paths
