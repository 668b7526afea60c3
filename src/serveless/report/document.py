"""A report is markdown; a person reads it on a terminal, in a file, or in a browser.

The experiments (profile, baseline, sweep, memory-compare) and `report --out` write their
results as markdown: it is what a code host shows and what a diff reads. The same text is
what the commands print, and printed raw its pipe tables are wider than any terminal and
every heading is a `#`. So the markdown is parsed (markdown-it-py, which rich itself
depends on) into blocks and each block is printed as the rest of the CLI prints: tables
through report/tables.py (whole, split, or one record per block; never a value cut),
prose wrapped at words, figures named by their file. The same parse renders the HTML
page of `report --html`, with each figure inline as SVG (report/html.py).

Only what our writers use is rendered: headings, paragraphs (code, bold, italics, images),
bullet lists, tables and fenced code. Raw HTML in the text is never passed through: a
job's name or a failed image's path is text, whatever it contains.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token
from rich.console import Console
from rich.text import Text

from .tables import Table, print_table
from .wrap import wrap_text


def parser() -> MarkdownIt:
    """CommonMark with tables; raw HTML escaped, not rendered."""
    return MarkdownIt("commonmark", {"html": False}).enable("table")


@dataclass
class Heading:
    level: int
    text: Text


@dataclass
class Paragraph:
    text: Text


@dataclass
class Bullets:
    items: list[Text]


@dataclass
class Code:
    text: str


@dataclass
class Image:
    src: str
    alt: str


def parse(markdown: str) -> list[Any]:
    """The blocks of a markdown text: Heading, Paragraph, Bullets, Code, Image, Table."""
    tokens = parser().parse(markdown)
    out: list[Any] = []
    it = iter(tokens)
    for tok in it:
        if tok.type == "heading_open":
            out.append(Heading(int(tok.tag[1:]), _inline(next(it))))
        elif tok.type == "paragraph_open":
            inline = next(it)
            images = [c for c in inline.children or [] if c.type == "image"]
            rest = [c for c in inline.children or []
                    if c.type != "image" and not (c.type == "text" and not c.content.strip())
                    and c.type not in ("softbreak", "hardbreak")]
            if images and not rest:  # a paragraph of figures
                out += [Image(str(c.attrs.get("src", "")), c.content) for c in images]
            else:
                out.append(Paragraph(_inline(inline)))
        elif tok.type == "bullet_list_open":
            out.append(Bullets([_inline(t) for t in _until(it, "bullet_list_close")
                                if t.type == "inline"]))
        elif tok.type in ("fence", "code_block"):
            out.append(Code(tok.content.rstrip("\n")))
        elif tok.type == "table_open":
            out.append(_table(list(_until(it, "table_close"))))
    return out


def _until(it: Iterator[Token], close: str) -> Iterator[Token]:
    for tok in it:
        if tok.type == close:
            return
        yield tok


def _inline(tok: Token) -> Text:
    """An inline token as styled text: code spans as their text, bold and italics styled,
    an image as its alt text and file."""
    text = Text()
    styles: list[str] = []
    for c in tok.children or []:
        style = " ".join(styles) or None
        if c.type == "text":
            text.append(c.content, style=style)
        elif c.type == "code_inline":
            text.append(c.content, style=style)
        elif c.type in ("softbreak", "hardbreak"):
            text.append(" ")
        elif c.type == "strong_open":
            styles.append("bold")
        elif c.type == "em_open":
            styles.append("italic")
        elif c.type in ("strong_close", "em_close") and styles:
            styles.pop()
        elif c.type == "image":
            text.append(f"{c.content} ({c.attrs.get('src', '')})", style=style)
    return text


def _table(tokens: list[Token]) -> Table:
    header: list[str] = []
    rows: list[list[str]] = []
    right: list[bool] = []
    in_head = False
    for k, tok in enumerate(tokens):
        if tok.type == "thead_open":
            in_head = True
        elif tok.type == "thead_close":
            in_head = False
        elif tok.type == "tr_open" and not in_head:
            rows.append([])
        elif tok.type in ("th_open", "td_open"):
            cell = _inline(tokens[k + 1]).plain if tokens[k + 1].type == "inline" else ""
            if in_head:
                header.append(cell)
                right.append("right" in str(tok.attrs.get("style", "")))
            else:
                rows[-1].append(cell)
    left = next((k for k, r in enumerate(right) if r), len(right))
    return Table(header, [r + [""] * (len(header) - len(r)) for r in rows], left=left)


def print_markdown(console: Console, markdown: str, base: Path | None = None) -> None:
    """A markdown text on the console: tables fitted, prose wrapped at words, figures
    named by their path (relative to `base`, the folder the markdown is in)."""
    width = console.width
    first = True
    for block in parse(markdown):
        if not first:
            console.print()
        first = False
        if isinstance(block, Heading):
            console.print(wrap_text(Text(block.text.plain, style="bold underline"
                                         if block.level == 1 else "bold"), width))
        elif isinstance(block, Paragraph):
            console.print(wrap_text(block.text, width))
        elif isinstance(block, Bullets):
            for item in block.items:
                console.print(wrap_text(Text("- ").append_text(item), width, hang="  "))
        elif isinstance(block, Code):
            console.print(Text(block.text), soft_wrap=True)
        elif isinstance(block, Image):
            where = (base / block.src) if base is not None else Path(block.src)
            console.print(wrap_text(Text(f"figure: {block.alt}: {where}"), width))
        elif isinstance(block, Table):
            print_table(console, block)
