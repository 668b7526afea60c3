"""`serveless export`: a job's predictions as one Parquet, CSV or JSONL table."""

from __future__ import annotations

from typing import Annotated

import typer

from ..store import DEFAULT_STORE
from .app import app
from .common import StoreOpt, StoreOptions, guarded, open_store, parse_options, say


@app.command("export")
def export_cmd(
    job: Annotated[str, typer.Argument(help="job name")],
    fmt: Annotated[str, typer.Option("--format", help="parquet, csv or jsonl")] = "parquet",
    out: Annotated[str | None, typer.Option(
        help="file or fsspec URL (default ./JOB.FORMAT)")] = None,
    with_scores: Annotated[bool, typer.Option(
        help="add every image's whole score vector (a job run with --save-scores)")] = False,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
) -> None:
    """Write a job's predictions as one table: record, index, filename, label, class_name,
    top5, top5_scores, scores, error."""
    from ..data.export import export

    st = open_store(store, store_option)
    target = out or f"{job}.{fmt}"
    n = guarded(lambda: export(st, job, fmt, target, with_scores,
                               parse_options(store_option) if "://" in target else None))
    say(f"wrote {n} rows to {target}")
