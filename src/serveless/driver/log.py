"""The invocation log: one row per invocation, in append-only segments under `<job>/log/`,
and the driver's own store requests (`driver.json`).

Every figure a report, an experiment or a simulation check shows is derived from these
rows, never from timers of their own, so a figure can always be checked against, or redrawn
from, what the store holds.

Why segments. An object store cannot append, and rewriting one log object whole every 2 s
uploaded a 40,000-call job's log 150 times over (2 GB in 5 minutes, 23 GB in an hour), on
the scheduling thread, which stalled for each upload. Now a thread of the log's own writes
the rows that came since the last flush as one new object, `log/<run>-<n>.jsonl`, every
`flush_every_s` or every `max_rows` rows: what is uploaded grows linearly with the job, and
the scheduler never waits for it. When the run ends its segments become one object,
`log/<run>.jsonl` (a reader meeting both, after a driver died between the two, keeps each
call once: rows carry their call's id). A driver killed between two flushes loses the rows
of its last seconds; the calls among them that wrote an output are recovered on resume from
what the function stored with the output (resume.py), so the log still holds every call
whose work is kept, and every cost figure counts it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

from ..backends import FunctionSpec, InvocationResult
from ..cost import billed_ms, vcpus
from ..errors import StoreError
from ..runtime.protocol import TOO_MANY_REQUESTS, Metrics
from ..store import JobLayout, Store

FLUSH_EVERY_S = 2.0  # the log's writer uploads new rows this often (see above)
MAX_ROWS = 2000  # or sooner, once this many are waiting


class InvocationLog:
    """The log of one run of a job: its rows so far (all runs'), written in segments by a
    thread of its own; `close` writes what is left and joins the run's segments."""

    def __init__(self, store: Store, layout: JobLayout, flush_every_s: float = FLUSH_EVERY_S,
                 max_rows: int = MAX_ROWS):
        self.store = store
        self.layout = layout
        self.rows: list[dict[str, Any]] = load_log(store, layout.job)
        self.run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.flush_every_s = flush_every_s
        self.max_rows = max_rows
        self._pending: list[dict[str, Any]] = []
        self._written: list[dict[str, Any]] = []  # this run's rows now in segments
        self._segments: list[str] = []
        self._seq = 0
        self._lock = threading.Lock()  # rows and pending
        self._io = threading.Lock()  # one writer of segments at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="serveless-log")
        self._thread.start()

    def append(self, row: dict[str, Any]) -> None:
        """Keep a row; it reaches the store with the next flush (in the background)."""
        with self._lock:
            self.rows.append(row)
            self._pending.append(row)
            if len(self._pending) >= self.max_rows:
                self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Write the rows not yet in the store as one new segment; False if the store
        refused (they stay pending: the next flush tries again)."""
        with self._io:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return True
            key = self.layout.log_segment(self.run, self._seq)
            try:
                self.store.put_bytes(key, _serialized(batch))
            except (OSError, StoreError):
                with self._lock:
                    self._pending = batch + self._pending
                return False
            self._seq += 1
            self._segments.append(key)
            self._written += batch
            return True

    def close(self) -> None:
        """Stop the writer, write what is left, and join this run's segments into one."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        for attempt in range(3):
            if self.flush():
                break
            time.sleep(0.5 * (attempt + 1))
        with self._io:
            if len(self._segments) < 2 or self._pending:
                return
            try:
                self.store.put_bytes(self.layout.log_run(self.run), _serialized(self._written))
            except (OSError, StoreError):
                return  # the segments hold every row: joining them is only tidiness
            for key in self._segments:
                try:
                    self.store.delete(key)
                except (OSError, StoreError):
                    continue
            self._segments = [self.layout.log_run(self.run)]


def _serialized(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


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
    """Every row of a job's log, in time order: its one-file log of older versions, then
    its segments by name (a run's, then the next run's). A call met twice is kept once."""
    layout = JobLayout(job)
    keys = [layout.legacy_log] if store.exists(layout.legacy_log) else []
    keys += store.list(layout.log_prefix, ".jsonl")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for key in keys:
        try:
            text = store.get_bytes(key).decode("utf-8", "replace")
        except StoreError:
            continue  # removed since it was listed (a run just joined its segments)
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line (older one-file logs); that invocation reruns
            if not is_row(row):
                continue
            call = row.get("call")
            if call:
                if call in seen:
                    continue
                seen.add(call)
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
            started: float, call: str = "") -> dict[str, Any]:
    """One invocation as the log keeps it: what was asked, what the platform measured and
    billed, what the function answered, and why it failed."""
    m = Metrics.from_dict(res.metrics)
    duration = float(res.duration_ms)  # the backend's (platform overhead included), billed
    return {
        "stage": stage,
        "record": record,
        "attempt": attempt,
        "call": call,
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
        "threads": m.threads,  # None from a function before 2026-12-04
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
