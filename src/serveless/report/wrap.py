"""Prose folded for a terminal at word boundaries, a path never broken.

Rich folds a line at the console's width wherever the width falls, so on an 80-column
terminal a summary read `…/predictions/*.jso` / `nl` and `jobs show` read `micro-batc` /
`h 32`: neither path nor word could be copied with a double click. Here a line breaks only
at spaces; a word (a path, a key, a URL) that does not fit on the line it would end goes to
the next one, and one longer than the whole width stands alone on its own line, whole (the
terminal then folds it on screen, and copying it still gives it back in one piece).
Continuation lines keep the indent the line began with, so a list item stays an item.

Output to a pipe or a file is never wrapped (cli/common.py): a log keeps each line whole
for grep.
"""

from __future__ import annotations

import re

from rich.cells import cell_len
from rich.text import Text

_WORD = re.compile(r"\S+")


def wrap_text(text: Text | str, width: int, hang: str | None = None) -> Text:
    """`text` with a line break before every word that would end past `width` columns.

    Styles are kept (the text is cut, not re-rendered); spaces at a break are dropped;
    existing line breaks stay; a line's continuations are indented as the line is, or by
    `hang` (a list item's `- ` hangs its continuations by two spaces).
    """
    if isinstance(text, str):
        text = Text(text)
    out = Text(end=text.end, style=text.style)
    lines = text.split("\n", allow_blank=True)
    for n, line in enumerate(lines):
        if n:
            out.append("\n")
        out.append_text(_wrap_line(line, max(1, width), hang))
    return out


def _wrap_line(line: Text, width: int, hang: str | None) -> Text:
    plain = line.plain
    if cell_len(plain) <= width:
        return line
    indent = plain[: len(plain) - len(plain.lstrip(" "))] if hang is None else hang
    if cell_len(indent) >= width // 2:  # an indent that would leave no room: drop it
        indent = ""
    pieces: list[tuple[int, int]] = []  # (start, end) of each output line's words
    start = end = None
    used = 0
    for m in _WORD.finditer(plain):
        w = cell_len(m.group())
        if start is None:  # the first word keeps the line's own indent
            start, end, used = 0, m.end(), cell_len(plain[: m.end()])
            continue
        gap = cell_len(plain[end : m.start()])
        if used + gap + w <= width:
            end, used = m.end(), used + gap + w
            continue
        pieces.append((start, end))
        start, end, used = m.start(), m.end(), cell_len(indent) + w
    if start is None:
        return line
    pieces.append((start, end))
    out = Text()
    for k, (a, b) in enumerate(pieces):
        if k:
            out.append("\n" + indent)
        out.append_text(line[a:b])
    return out
