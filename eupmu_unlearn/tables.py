"""The one table renderer of every command's output: markdown with aligned columns.

Padded to a common width per column, a table reads as plain text on a terminal and renders as a
table in markdown. Callers format their cells; this module only lays them out.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    body = [[str(cell) for cell in row] for row in rows]
    if any(len(row) != len(header) for row in body):
        raise ValueError(f"every row needs {len(header)} cells")
    widths = [max([len(title), *(len(row[i]) for row in body)]) for i, title in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in body)])
