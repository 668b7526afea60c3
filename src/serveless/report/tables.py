"""Tables as a person reads them: on a console (one style for every command, never a value
cut to fit) and in markdown reports.

`print_fitting` prints a table whole where it fits the console; else as two tables (the
first columns, then the first column with the rest); else one line per row. A value is
never shortened with an ellipsis: a cost that reads `0.00…` cannot be read at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


def table(title: str, columns: Sequence[str], rows: list[list[str]], left: int = 0) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for k, col in enumerate(columns):
        table.add_column(col, justify="left" if k < left else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def print_fitting(console: Console, titles: tuple[str, str, str], columns: Sequence[str],
                  rows: list[list[str]], split_at: int, left: int = 1) -> None:
    """`rows` as one table where it fits the console; else as two (columns[:split_at], then
    the first column with the rest); else one line per row: a value is never cut to fit.
    `titles`: the whole table's, then the two halves'. The first `left` columns are text."""
    def natural(table: Table) -> int:  # the width it takes unconstrained, not clamped
        return console.measure(table, options=console.options.update_width(10_000)).maximum

    whole = table(titles[0], columns, rows, left)
    if natural(whole) <= console.width:
        console.print(whole)
        return
    first = table(titles[1], columns[:split_at], [r[:split_at] for r in rows], left)
    second = table(titles[2], (columns[0], *columns[split_at:]),
                    [[r[0], *r[split_at:]] for r in rows], min(left, 1))
    if max(natural(t) for t in (first, second)) <= console.width:
        console.print(first)
        console.print(second)
        return
    console.print(f"{titles[0]}:", markup=False, highlight=False)
    for row in rows:
        console.print(f"{columns[0]} {row[0]}: " + ", ".join(
            f"{name} {value}" for name, value in zip(columns[1:], row[1:], strict=True)),
            markup=False, highlight=False)


def markdown_table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    """A GitHub markdown table; numbers are right-aligned so columns read like the console's."""
    right = set(range(1, len(headers))) if right is None else right
    sep = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"
