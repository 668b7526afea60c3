"""The run summary (report/summary.py) as `run` and `report` print it: every value whole at
any terminal width."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from serveless.driver.log import load_log
from serveless.report.summary import print_summary, stage_cells, summarize
from serveless.store import Store

# -- the summary at 80, 100 and 160 columns ---------------------------------------------------


@pytest.mark.parametrize("width", [40, 80, 100, 160])
def test_summary_fits_the_terminal_with_every_value_whole(done_store, width):
    rows = load_log(Store(str(done_store)), "done")
    out = io.StringIO()
    print_summary(rows, 12.5, "x86_64", Console(file=out, width=width, force_terminal=False))
    text = out.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    table_lines = [line for line in lines if not line.startswith("total ")]
    assert max(len(line.rstrip()) for line in table_lines) <= width, text
    tokens = set(" ".join(lines).replace(",", " ").split()) | set(text.split())
    for row in stage_cells(summarize(rows)):
        for value in row:
            whole = value in tokens or any(f"{value}{end}" in text for end in ",:")
            assert whole, (value, text)
