"""The jobs in a store and where each stands, from what the store holds alone.

A job is done when every record has its predictions; failed when a record without
predictions ended its last invocation in an error; partial otherwise (interrupted, or
not started). The figures come from job.json, the predictions and the invocation log.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

from ..data.predictions import prediction_keys, record_of
from ..errors import JobError
from ..report.summary import summarize
from ..store import MODELS_PREFIX, JobLayout, Store
from .lease import TTL_S, describe, gone, read_lease
from .log import load_driver_requests, load_log
from .spec import JobSpec


@dataclass
class JobStatus:
    job: str
    state: str  # done | partial | failed
    records: int
    records_done: int
    images: int
    failed_images: int
    cost: float
    per_million: float
    last_run: str  # UTC date and time of the last invocation, "" if none
    spec: JobSpec
    failed_records: dict[str, str]
    lease: dict[str, Any] | None = None  # the driver that runs it now (lease.py), if any

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "spec"}
        out["spec"] = self.spec.__dict__
        return out


def list_jobs(store: Store) -> list[str]:
    """Names of the folders at the top of the store that hold a job.json."""
    names = [key.strip("/").rsplit("/", 1)[-1] for key in store.list("")]
    jobs = []
    for name in names:
        try:
            if store.exists(JobLayout(name).spec):
                jobs.append(name)
        except ValueError:  # not a job name (e.g. a dot-folder of the store's own)
            continue
    return sorted(jobs)


def job_status(store: Store, job: str, arch: str = "x86_64") -> JobStatus:
    spec = JobSpec.load(store, job)
    done = {record_of(key) for key in prediction_keys(store, job)}
    rows = load_log(store, job)
    last: dict[str, dict[str, Any]] = {}
    for row in rows:  # the log is in time order: keep each record's last invocation
        last[row["record"]] = row
    failed = {}
    for rec in spec.records:
        row = last.get(rec)
        if rec not in done and row is not None and row.get("error"):
            failed[rec] = f"stage {row['stage']}: {row['error'].get('type')}: " \
                          f"{row['error'].get('message')}"
    summary = summarize(rows, arch, load_driver_requests(store, job)) if rows else None
    failed_images = sum(int(r.get("image_errors") or 0) for r in rows
                        if r.get("error") is None and int(r["stage"]) == spec.stages - 1)
    state = "done" if done >= set(spec.records) else "failed" if failed else "partial"
    when = ""
    if rows:
        stamp = max(float(r["started"]) for r in rows)
        when = dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M")
    return JobStatus(
        job=job, state=state, records=len(spec.records),
        records_done=len(done & set(spec.records)),
        images=summary["images"] if summary else 0, failed_images=failed_images,
        cost=summary["cost"] if summary else 0.0,
        per_million=summary["per_million"] if summary else 0.0,
        last_run=when, spec=spec, failed_records=failed, lease=read_lease(store, job),
    )


def intermediate_prefixes(store: Store, job: str) -> list[str]:
    """The stage output folders of a job (stage-0 … stage-K-2): everything `clean` removes."""
    layout = JobLayout(job)
    return [key.strip("/") for key in store.list(layout.job)
            if key.rsplit("/", 1)[-1].startswith("stage-")]


def check_not_running(store: Store, job: str) -> None:
    """Refuse to change a job that a driver is running now (its lease is fresh)."""
    lease = read_lease(store, job)
    if lease is not None and time.time() - float(lease.get("renewed", 0)) <= TTL_S \
            and not gone(lease):
        raise JobError(f"job {job!r} is being run by a driver ({describe(lease)}); "
                       "wait for it to finish")


def clean_job(store: Store, job: str) -> int:
    """Remove a job's intermediate outputs, keeping records, models, predictions and the
    log; returns the bytes freed. Unfinished records restart from stage 0 on resume."""
    JobSpec.load(store, job)  # a clear error if there is no such job
    check_not_running(store, job)
    freed = 0
    for prefix in intermediate_prefixes(store, job):
        freed += store.du(prefix)
        store.delete(prefix)
    return freed


def delete_job(store: Store, job: str) -> int:
    """Remove everything of a job; returns the bytes freed."""
    layout = JobLayout(job)
    if not store.exists(layout.spec):
        raise JobError(f"no job {job!r} in {store.url}")
    check_not_running(store, job)
    freed = store.du(layout.job)
    store.delete(layout.job)
    return freed


def shared_models(spec: JobSpec) -> list[str]:
    """The store prefixes a job shares with jobs of the same model and cuts: its stage
    models (models/<digest>) and, for an int8 or float16 job, its calibrated cache. Only
    well-formed `models/<name>` prefixes: a job.json is input, and deleting follows it."""
    out = [spec.models, (spec.quantize or {}).get("cache") or ""]
    return [p for p in out if isinstance(p, str) and p.count("/") == 1
            and p.startswith(f"{MODELS_PREFIX}/") and p.split("/")[1] not in ("", ".", "..")]


def unused_models(store: Store, prefixes: list[str]) -> tuple[list[str], str | None]:
    """Which of `prefixes` no job left in the store uses, and why none may be deleted when
    a job's job.json cannot be read (it might use them)."""
    used: set[str] = set()
    for name in list_jobs(store):
        try:
            used.update(shared_models(JobSpec.load(store, name)))
        except (JobError, ValueError, OSError) as exc:
            return [], f"job {name}'s job.json cannot be read ({exc})"
    return [p for p in dict.fromkeys(prefixes) if p not in used], None


def status_json(status: JobStatus) -> str:
    return json.dumps(status.to_dict(), indent=2)

