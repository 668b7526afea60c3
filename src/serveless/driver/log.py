"""The invocation log, `<job>/invocations.jsonl`: one row per invocation, written as each
ends, and the driver's own store requests (`driver.json`).

Every figure a report, an experiment or a simulation check shows is derived from these
rows, never from timers of their own, so a figure can always be checked against, or redrawn
from, what the store holds. A local folder gets a true append per row; an object store
cannot append, so there the whole log is rewritten at most every `flush_every_s` and at
the end.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from ..backends import FunctionSpec, InvocationResult
from ..cost import billed_ms, vcpus
from ..errors import StoreError
from ..runtime.protocol import TOO_MANY_REQUESTS, Metrics
from ..store import JobLayout, Store


class InvocationLog:
    """<job>/invocations.jsonl, written as each invocation ends so a killed driver loses none.

    Local folders get a true append; object stores cannot append, so there the whole log
    is rewritten, at most every `flush_every_s` and at the end.
    """

    def __init__(self, store: Store, layout: JobLayout, flush_every_s: float = 2.0):
        self.store = store
        self.key = layout.log
        self.rows: list[dict[str, Any]] = load_log(store, layout.job)
        self._lock = threading.Lock()
        self._flushed = time.monotonic()
        self._dirty = False
        self.flush_every_s = flush_every_s
        self._append_path = store.local_path(self.key)
        if self._append_path:
            os.makedirs(os.path.dirname(self._append_path), exist_ok=True)
            # rewrite once: drops a torn last line left by a killed driver
            self.store.put_bytes(self.key, self._serialized())

    def _serialized(self) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in self.rows).encode()

    def append(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.rows.append(row)
            if self._append_path:
                with open(self._append_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                return
            self._dirty = True
            due = time.monotonic() - self._flushed > self.flush_every_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            data = self._serialized()
            self._flushed = time.monotonic()
            self._dirty = False
        self.store.put_bytes(self.key, data)


def load_driver_requests(store: Store, job: str) -> dict[str, int]:
    """The driver's store requests for a job, by kind ({} for jobs from before they were
    counted)."""
    key = JobLayout(job).driver
    try:
        data = json.loads(store.get_bytes(key)) if store.exists(key) else {}
    except (StoreError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}


def save_driver_requests(store: Store, layout: JobLayout, before: Any) -> dict[str, int]:
    """Add the requests this store object made since `before` (and the write of this
    record itself) to the job's driver.json; returns the job's totals."""
    old = load_driver_requests(store, layout.job)
    store.requests["put"] += 1  # the write just below
    total = dict(old)
    for kind, n in (store.requests - before).items():
        total[kind] = total.get(kind, 0) + n
    store.put_bytes(layout.driver, json.dumps(total, sort_keys=True).encode())
    store.requests["put"] -= 1  # counted once, by the put_bytes above
    return total


def load_log(store: Store, job: str) -> list[dict[str, Any]]:
    key = JobLayout(job).log
    if not store.exists(key):
        return []
    rows = []
    for line in store.get_bytes(key).decode("utf-8", "replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed driver; that invocation reruns
            if is_row(row):
                rows.append(row)
    return rows


_ROW_FIELDS = {"stage": int, "record": str, "attempt": int, "started": (int, float),
               "memory_mb": int, "init_ms": (int, float), "duration_ms": (int, float)}


def is_row(row: Any) -> bool:
    """Whether a line of the log is an invocation row every reader can use: one edited by
    hand into something else is left out (its invocation, if it wrote nothing, runs again)."""
    return isinstance(row, dict) and all(
        isinstance(row.get(k), typ) and not isinstance(row.get(k), bool)
        for k, typ in _ROW_FIELDS.items())


def log_row(stage: int, record: str, attempt: int, fn: FunctionSpec, res: InvocationResult,
            started: float) -> dict[str, Any]:
    """One invocation as the log keeps it: what was asked, what the platform measured and
    billed, what the function answered, and why it failed."""
    m = Metrics.from_dict(res.metrics)
    duration = float(res.duration_ms)  # the backend's (platform overhead included), billed
    return {
        "stage": stage,
        "record": record,
        "attempt": attempt,
        "started": round(started, 3),
        "memory_mb": fn.memory_mb,
        "vcpus": round(vcpus(fn.memory_mb), 3),
        "cold": res.cold,
        "model_source": m.model_source,  # memory | disk | store
        "init_ms": round(res.init_ms, 3),
        "duration_ms": round(duration, 3),
        "billed_ms": billed_ms(duration, res.init_ms),
        "peak_mb": res.peak_mb,  # what a memory cap is held to (memory.py)
        "peak_rss_mb": m.peak_rss_mb,
        "peak_cgroup_mb": m.peak_cgroup_mb,
        "peak_working_set_mb": m.peak_working_set_mb,
        "images": m.images,
        "image_errors": m.image_errors,
        "read_ms": m.read_ms,
        "compute_ms": m.compute_ms,
        "write_ms": m.write_ms,
        "cpu_ms": m.cpu_ms,
        "bytes_in": m.bytes_in,
        "bytes_out": m.bytes_out,
        "gets": m.gets,
        "heads": m.heads,
        "puts": m.puts,
        "output": m.output,
        **({"failed_images": m.failed_images} if m.failed_images is not None else {}),
        "instance": res.instance,
        "error": res.error.to_dict() if res.error is not None else None,
        "throttled": res.error is not None and res.error.type == TOO_MANY_REQUESTS,  # not billed
    }
