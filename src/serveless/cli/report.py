"""`serveless report` (a job's summary again, as JSON, or as report.md) and `serveless export`
(its predictions as one table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..store import DEFAULT_STORE, JobLayout, Store
from .app import app
from .common import (
    StoreOpt,
    StoreOptions,
    console,
    fail,
    guarded,
    open_store,
    parse_options,
    say,
)


@app.command()
def report(
    jobs: Annotated[list[str], typer.Argument(help="job name(s)")],
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    arch: Annotated[str, typer.Option(help="x86_64 or arm64 Lambda prices")] = "x86_64",
    out: Annotated[Path | None, typer.Option(
        help="write DIR/report.md with tables, plots, machine and versions, and "
             "DIR/report.html (the same in one file)")] = None,
    html_file: Annotated[Path | None, typer.Option(
        "--html", metavar="FILE",
        help="write the report as one self-contained HTML page (plots inline, no network)")]
    = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print the summary as JSON on stdout (a list for several jobs)")] = False,
) -> None:
    """Re-print jobs' summaries from their invocation logs alone (or write a report: markdown
    with plots, or one HTML page)."""
    from ..driver.log import load_driver_requests, load_log
    from ..driver.spec import JobSpec
    from ..report.summary import failed_image_lines, job_notes, log_wall_s, print_summary

    if as_json:
        from ..report.summary import summary_json

        st = open_store(store, store_option)
        found = []
        for job in jobs:
            rows, spec, acc = guarded(lambda job=job: _report_inputs(st, job, store))
            driver = load_driver_requests(st, job)
            found.append(guarded(lambda r=rows, s=spec, a=acc, d=driver: summary_json(
                r, arch, s, a, d)))
        typer.echo(json.dumps(found[0] if len(found) == 1 else found, indent=2))
        return
    if out is not None or html_file is not None:
        from ..report.jobreport import write_job_report

        st = open_store(store, store_option)
        written = guarded(lambda: write_job_report(st, jobs, out, html_file, arch))
        say("wrote " + " and ".join(str(p) for p in written))
        return
    st = open_store(store, store_option)
    for job in jobs:
        rows = guarded(lambda job=job: load_log(st, JobLayout(job).job))
        if not rows:
            fail(f"no invocation log for job {job!r} in {store}")
        if len(jobs) > 1:
            console.print(f"[bold]job {job}[/bold]")
        spec = guarded(lambda job=job: JobSpec.load(st, job) if st.exists(
            JobLayout(job).spec) else None)
        notes = job_notes(st, job, spec.quantize if spec else None,
                          spec.model if spec else None)
        print_summary(rows, log_wall_s(rows), arch, console, notes,
                      driver=load_driver_requests(st, job))
        for line in failed_image_lines(rows):
            say(line)


def _report_inputs(st: Store, job: str, store: str) -> tuple[list, dict, dict | None]:
    """(log rows, job.json, accuracy of the labelled predictions) of a job, for --json."""
    from ..data.predictions import accuracy
    from ..driver.log import load_log

    layout = JobLayout(job)
    rows = load_log(st, layout.job)
    if not rows:
        fail(f"no invocation log for job {job!r} in {store}")
    spec = json.loads(st.get_bytes(layout.spec)) if st.exists(layout.spec) else {"job": job}
    return rows, spec, accuracy(st, job)


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
