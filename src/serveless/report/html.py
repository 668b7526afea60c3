"""One HTML page from a report's markdown: a single file to open or send, that needs nothing
else.

report.md with PNGs beside it reads well on a code host, but a person who wants to look
at a job had three files to open. The page holds the same text and tables, each figure
inline as SVG (drawn from the same matplotlib figure as the PNG), and its own stylesheet:
no script, no font, image or style sheet fetched, nothing that needs a network. Tables
scroll sideways in their own box and figures scale to the width, so it reads on a laptop
and at phone width alike. The markdown is rendered by markdown-it-py with raw HTML
escaped (report/document.py), so a job's name or an image's path is always text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from .document import parser
from .plots import svg_of

STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d1d1f; margin: 0 auto; padding: 1rem; max-width: 64rem; }
h1 { font-size: 1.6rem; margin-top: 0.5rem; }
h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1rem; }
code { font: 0.9em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background: #f3f3f3; padding: 0 0.2em; overflow-wrap: anywhere; }
pre { background: #f3f3f3; padding: 0.6rem; overflow-x: auto; }
pre code { background: none; }
.table { overflow-x: auto; margin: 0.8rem 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #e3e3e3; white-space: nowrap;
         text-align: left; }
th { border-bottom: 2px solid #bbb; }
td[style*="right"], th[style*="right"] { text-align: right; }
figure { margin: 1rem 0; }
figure svg { width: 100%; height: auto; max-width: 56rem; display: block; }
figcaption { color: #555; font-size: 0.9rem; }
.missing { color: #a33; }
"""


def html_page(title: str, markdown: str, figures: Mapping[str, Figure]) -> str:
    """The page: the markdown rendered, each `![alt](name)` whose name is in `figures` as
    that figure's SVG; an image not given is named, never linked."""
    md = parser()
    shown: list[str] = []

    def image(_r: Any, tokens: Sequence[Any], idx: int, options: Any, env: Any) -> str:
        tok = tokens[idx]
        src = str(tok.attrs.get("src", ""))
        alt = html.escape(tok.content)
        if src in figures:
            shown.append(src)
            svg = svg_of(figures[src], prefix=f"fig{len(shown)}")
            return (f"<figure>{svg}<figcaption>{alt}</figcaption>"
                    "</figure>")
        return f'<span class="missing">[figure {alt}: {html.escape(src)} not embedded]</span>'

    def table_open(_r: Any, tokens: Sequence[Any], idx: int, options: Any, env: Any) -> str:
        return '<div class="table"><table>\n'

    def table_close(_r: Any, tokens: Sequence[Any], idx: int, options: Any,
                    env: Any) -> str:
        return "</table></div>\n"

    # markdown-it binds each rule to its renderer: the first argument is the renderer
    md.add_render_rule("image", image)
    md.add_render_rule("table_open", table_open)
    md.add_render_rule("table_close", table_close)
    body = md.render(markdown)
    # a paragraph that holds only a figure: no <p> around a <figure> (invalid HTML)
    body = body.replace("<p><figure>", "<figure>").replace("</figure></p>", "</figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}</body>\n</html>\n")
