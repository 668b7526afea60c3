"""`serveless jobs`: list, inspect, clean and delete the jobs in a store."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import JobError
from ..report.tables import Table, print_table
from ..store import DEFAULT_STORE
from .app import app
from .common import ArchOpt, StoreOpt, StoreOptions, console, fail, guarded, open_store, say

jobs_app = typer.Typer(help="List, inspect, clean and delete jobs in a store.",
                       invoke_without_command=True)
app.add_typer(jobs_app, name="jobs")

JobArg = Annotated[str, typer.Argument(metavar="JOB", help="job name")]


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    arch: ArchOpt = "x86_64",
) -> None:
    """List the jobs in the store with their state, images, cost and last run."""
    if ctx.invoked_subcommand is not None:
        return
    from ..driver.jobs import job_status, list_jobs

    st = open_store(store, store_option)
    names = guarded(lambda: list_jobs(st))
    if not names:
        say(f"no jobs in {st.url}")
        return
    rows = []
    unreadable = []
    for name in names:
        try:
            s = job_status(st, name, arch)
        except JobError as exc:  # one broken job.json must not hide the store's other jobs
            unreadable.append(str(exc))
            rows.append([name, "unreadable", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([s.job, s.state, f"{s.records_done}/{s.records}", f"{s.images:,}",
                     f"{s.failed_images:,}", f"{s.cost:.6f}", f"{s.per_million:.2f}",
                     s.last_run or "-"])
    print_table(console, Table(
        ["job", "state", "records", "images", "failed images", "cost $", "$ per 1M",
         "last run (UTC)"], rows, f"jobs in {st.url}", left=2))
    for why in unreadable:
        say(why, err=True)


@jobs_app.command("show")
def jobs_show(
    job: JobArg,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    arch: ArchOpt = "x86_64",
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """What a job was asked (job.json) and where it stands."""
    from ..driver.jobs import job_status, status_json

    st = open_store(store, store_option)
    s = guarded(lambda: job_status(st, job, arch))
    if as_json:
        typer.echo(status_json(s))
        return
    from ..data.tensors import TensorFormat
    from ..driver.lease import describe

    spec = s.spec
    fields = [
        ("state", f"{s.state}, {s.records_done} of {s.records} records done"),
        ("images", f"{s.images:,} served, {s.failed_images:,} failed"),
        ("model", spec.model),
        ("cuts", ", ".join(spec.cuts) or "none (one stage)"),
        ("memory", " / ".join(f"{mb} MB" for mb in spec.memory)),
        ("micro-batch", str(spec.micro_batch)),
        ("concurrency", str(spec.concurrency)),
        ("retries", str(spec.retries)),
        ("precision", spec.precision),
        ("intermediates", TensorFormat.from_dict(spec.format).describe()),
        ("output", f"embeddings of {spec.tensor or 'the model output'} "
                   f"({spec.format.get('dtype', 'float32')}), a row per image"
         if spec.output == "embeddings" else f"predictions ({spec.scores})"),
        ("modeled cost", f"${s.cost:.6f} (${s.per_million:.2f} per 1M images, {arch})"),
        ("last run", f"{s.last_run} UTC" if s.last_run else "never"),
        ("driver", describe(s.lease) if s.lease else "none (not running)"),
    ]
    print_table(console, Table(["", ""], [[k, v] for k, v in fields], f"job {s.job}",
                               left=2, header=False))
    for rec, why in sorted(s.failed_records.items()):
        say(f"failed record {rec}: {why}")


@jobs_app.command("clean")
def jobs_clean(
    job: JobArg,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
) -> None:
    """Remove a job's intermediate outputs; keep its records, models, predictions and log."""
    from ..driver.jobs import clean_job

    st = open_store(store, store_option)
    freed = guarded(lambda: clean_job(st, job))
    say(f"removed the intermediates of {job}: {freed / 1e6:,.1f} MB freed")


@jobs_app.command("delete")
def jobs_delete(
    job: JobArg,
    store: StoreOpt = DEFAULT_STORE,
    store_option: StoreOptions = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]
    = False,
    keep_models: Annotated[bool, typer.Option(
        "--keep-models", help="keep its stage models even when no other job uses them")]
    = False,
) -> None:
    """Delete a job and everything it holds in the store, and its stage models (shared by
    jobs of the same model and cuts) once no other job uses them."""
    from ..driver.jobs import (
        check_not_running,
        delete_job,
        job_status,
        shared_models,
        unused_models,
    )

    st = open_store(store, store_option)
    s = guarded(lambda: job_status(st, job))
    guarded(lambda: check_not_running(st, job))
    if not yes and not typer.confirm(
            f"delete job {job} ({s.state}, {s.images:,} images) from {st.url}?", default=False):
        fail("not deleted", 1)
    freed = guarded(lambda: delete_job(st, job))
    say(f"deleted {job}: {freed / 1e6:,.1f} MB freed")
    prefixes = shared_models(s.spec)
    if keep_models or not prefixes:
        return
    unused, why = guarded(lambda: unused_models(st, prefixes))
    if why:
        say(f"kept its stage models ({', '.join(prefixes)}): {why}")
    for prefix in unused:
        size = guarded(lambda prefix=prefix: st.du(prefix))
        guarded(lambda prefix=prefix: st.delete(prefix))
        say(f"deleted {prefix}, used by no other job: {size / 1e6:,.1f} MB freed")
    for prefix in prefixes:
        if prefix not in unused and not why:
            say(f"kept {prefix}: other jobs use it")
