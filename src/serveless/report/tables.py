"""Tables as a person reads them: one table type, printed on a console (one style for every
command, never a value cut to fit), written as markdown, and as HTML.

Every table the CLI prints goes through `print_table`. Rich, left to itself, squeezes a
table that is too wide by cutting values (`d…` for a state, `0.00…` for a cost, `1,…` for
1,500 images), and a value cut that way cannot be read at all. So a table is printed
whole where it fits; else split into tables that do, each repeating the first column (the
row's name), in the column groups its caller names if those fit, else as many as it takes
while each holds two columns or more beside the name; else (the name and one column alone
fit, as at 40 columns, or a long name leaves room for one value per table) one record per
block, a line per field, wrapped at words (report/wrap.py). The style is rich's
SIMPLE_HEAD: a rule under the header, no box, as the run summary always had.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from .wrap import wrap_text

STYLE = box.SIMPLE_HEAD


@dataclass
class Table:
    """A table of formatted cells. The first `left` columns are text (left-aligned), the
    rest numbers (right-aligned). `groups`: how the caller would split it when it is too
    wide, as (title, column indices) each holding column 0; None: split as needed."""

    columns: Sequence[str]
    rows: list[list[str]]
    title: str = ""
    left: int = 1
    groups: list[tuple[str, list[int]]] | None = field(default=None)
    header: bool = True  # False: a list of fields and values, no header line

    def markdown(self) -> str:
        return markdown_table(list(self.columns), self.rows,
                              right=set(range(self.left, len(self.columns))))

    def html(self) -> str:
        return html_table(self)

    def part(self, title: str, cols: Sequence[int]) -> Table:
        return Table([self.columns[c] for c in cols], [[r[c] for c in cols] for r in self.rows],
                     title, sum(1 for c in cols if c < self.left), header=self.header)


def rich_table(t: Table) -> RichTable:
    """The table as rich draws it, without its title: a title is prose, printed above it
    by `print_table` and wrapped at words (rich would fold a long path in it)."""
    out = RichTable(box=STYLE, show_header=t.header)
    for k, col in enumerate(t.columns):
        out.add_column(col, justify="left" if k < t.left else "right", no_wrap=True)
    for row in t.rows:
        out.add_row(*[Text(str(c)) for c in row])  # as text: a '[' in a name is not markup
    return out


def natural_width(console: Console, t: Table) -> int:
    """The columns the table takes unconstrained (never what rich would squeeze it to)."""
    options = console.options.update_width(10_000)
    return console.measure(rich_table(t), options=options).maximum


def print_table(console: Console, t: Table) -> None:
    """`t` whole where it fits the console; else split (see the module's docstring)."""
    width = console.width
    if natural_width(console, t) <= width:
        _print_whole(console, t, width)
        return
    parts = _split(console, t, width)
    if parts is None:
        _print_records(console, t, width)
        return
    for part in parts:
        _print_whole(console, part, width)


def _print_whole(console: Console, t: Table, width: int) -> None:
    if t.title:
        console.print(wrap_text(Text(t.title, style="italic"), width))
    console.print(rich_table(t))


def _split(console: Console, t: Table, width: int) -> list[Table] | None:
    """Tables of column 0 and a group of the others, each within `width`; None if one
    column beside the first does not fit."""
    if t.groups and all(natural_width(console, t.part(title, cols)) <= width
                        for title, cols in t.groups):
        return [t.part(title, cols) for title, cols in t.groups]
    groups: list[list[int]] = []
    current = [0]
    for c in range(1, len(t.columns)):
        if natural_width(console, t.part("", [*current, c])) <= width:
            current.append(c)
            continue
        if len(current) == 1:
            return None
        groups.append(current)
        current = [0, c]
        if natural_width(console, t.part("", current)) > width:
            return None
    groups.append(current)
    n = len(groups)
    if n > 2 and any(len(g) == 2 for g in groups):
        # A name and one value per table, many tables over: a block per row reads better
        # (a job name of 51 characters split `serveless jobs` into 4 such tables at 80).
        return None
    return [t.part(f"{t.title} ({k} of {n})" if t.title else "", cols)
            for k, cols in enumerate(groups, 1)]


def _print_records(console: Console, t: Table, width: int) -> None:
    """One block per row: its name, then `field: value` lines, wrapped at words."""
    if t.title:
        console.print(wrap_text(Text(t.title + ":", style="bold"), width))
    if not t.header:  # fields and values: one line each
        for row in t.rows:
            console.print(wrap_text(f"{row[0]}: {' '.join(row[1:])}", width, hang="  "))
        return
    for row in t.rows:
        console.print(wrap_text(Text(f"{t.columns[0]} {row[0]}", style="bold"), width))
        for name, value in zip(t.columns[1:], row[1:], strict=True):
            console.print(wrap_text(f"  {name}: {value}", width))


def markdown_table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    """A GitHub markdown table; numbers are right-aligned so columns read like the console's."""
    right = set(range(1, len(headers))) if right is None else right
    sep = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def html_table(t: Table) -> str:
    """The table as HTML in a box that scrolls sideways on a narrow screen."""
    def cell(tag: str, k: int, value: Any) -> str:
        cls = "" if k < t.left else ' class="num"'
        return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", k, c) for k, c in enumerate(t.columns))
    body = "".join("<tr>" + "".join(cell("td", k, v) for k, v in enumerate(row)) + "</tr>"
                   for row in t.rows)
    caption = f"<caption>{html.escape(t.title)}</caption>" if t.title else ""
    return (f'<div class="table"><table>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")
