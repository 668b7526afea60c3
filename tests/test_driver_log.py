"""The invocation log in append-only segments (issue 21): each flush writes only the new
rows, off the scheduling thread, so what is uploaded grows linearly with the job; a run's
segments are joined at its end; old one-file logs are still read; a call is counted once."""

from __future__ import annotations

import json
import time
import uuid

from serveless.driver.log import InvocationLog, load_log
from serveless.store import JobLayout, Store


def _row(i: int, call: str | None = None) -> dict:
    return {"stage": 0, "record": f"r{i}", "attempt": 0, "call": call or uuid.uuid4().hex,
            "started": 1.0 + i, "memory_mb": 1769, "init_ms": 0.0, "duration_ms": 10.0,
            "error": None, "pad": "x" * 500}


class CountingStore(Store):
    """A memory store that counts the bytes each PUT uploads, and can be made slow."""

    def __init__(self) -> None:
        super().__init__(f"memory://log-{uuid.uuid4().hex}")
        self.uploaded = 0
        self.delay = 0.0

    def put_bytes(self, key: str, data: bytes) -> None:
        time.sleep(self.delay)
        self.uploaded += len(data)
        super().put_bytes(key, data)


def test_what_is_uploaded_grows_linearly_with_the_rows():
    store = CountingStore()
    log = InvocationLog(store, JobLayout("j"), flush_every_s=3600)
    rows = [_row(i) for i in range(2000)]
    for i, row in enumerate(rows):
        log.append(row)
        if i % 50 == 49:
            log.flush()  # 40 flushes: a rewritten log would upload ~20x the rows
    size = sum(len(json.dumps(r)) + 1 for r in rows)
    assert size <= store.uploaded <= 1.05 * size
    log.close()  # joined: the rows once more
    assert store.uploaded <= 2.05 * size
    assert store.list("j/log", ".jsonl") == [f"j/log/{log.run}.jsonl"]
    assert [r["record"] for r in load_log(store, "j")] == [r["record"] for r in rows]


def test_appending_never_waits_for_the_store():
    store = CountingStore()
    store.delay = 0.5  # every upload takes half a second
    log = InvocationLog(store, JobLayout("j"), flush_every_s=0.01)
    t0 = time.perf_counter()
    for i in range(200):
        log.append(_row(i))
    appended = time.perf_counter() - t0
    log.close()
    assert appended < 0.2, f"append waited for uploads: {appended:.2f} s"
    assert len(load_log(store, "j")) == 200


def test_a_row_is_in_the_store_within_a_flush_interval():
    store = CountingStore()
    log = InvocationLog(store, JobLayout("j"), flush_every_s=0.05)
    log.append(_row(1))
    deadline = time.monotonic() + 5
    while not load_log(store, "j") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r["record"] for r in load_log(store, "j")] == ["r1"]
    log.close()


def test_old_one_file_logs_and_several_runs_read_in_order_each_call_once():
    store = Store(f"memory://log-{uuid.uuid4().hex}")
    old = [_row(i) for i in range(3)]
    for r in old:
        del r["call"]  # logs written before calls had ids
    store.put_bytes("j/invocations.jsonl",
                    ("".join(json.dumps(r) + "\n" for r in old) + '{"torn').encode())
    first = InvocationLog(store, JobLayout("j"))
    assert len(first.rows) == 3
    dup = _row(10, call="c10")
    first.append(dup)
    first.append(_row(11))
    first.close()
    time.sleep(1.1)  # the next run's name sorts after
    second = InvocationLog(store, JobLayout("j"))
    second.append(_row(12))
    second.flush()
    store.put_bytes(f"j/log/{second.run}-000009.jsonl", (json.dumps(dup) + "\n").encode())
    second.close()
    records = [r["record"] for r in load_log(store, "j")]
    assert records == ["r0", "r1", "r2", "r10", "r11", "r12"]


def test_rows_that_are_not_rows_are_left_out():
    store = Store(f"memory://log-{uuid.uuid4().hex}")
    good = _row(1)
    lines = [json.dumps(good), "[1, 2]", json.dumps({**_row(2), "stage": "0"}),
             json.dumps({"record": "x"}), json.dumps({**_row(3), "attempt": True})]
    store.put_bytes("j/log/a.jsonl", ("\n".join(lines) + "\n").encode())
    assert [r["record"] for r in load_log(store, "j")] == ["r1"]


def test_close_writes_what_a_failed_flush_left(monkeypatch):
    store = CountingStore()
    log = InvocationLog(store, JobLayout("j"), flush_every_s=3600)
    real = store.put_bytes
    failures = iter([OSError("503 SlowDown")])

    def flaky(key: str, data: bytes) -> None:
        for exc in failures:
            raise exc
        real(key, data)

    monkeypatch.setattr(store, "put_bytes", flaky)
    log.append(_row(1))
    assert not log.flush()  # refused: the row stays pending
    log.append(_row(2))
    log.close()
    assert [r["record"] for r in load_log(store, "j")] == ["r1", "r2"]
