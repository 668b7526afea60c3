"""The scheduler's policy, asserted (issue 25): deepest stage first, resume from the deepest
stage the store holds (known exactly, no random kill), and exactly `retries` retries."""

from __future__ import annotations

import json
import threading

import pytest
from datakit import image_folder, save, tiny_classifier

from serveless.backends import FunctionSpec, InvocationResult
from serveless.data.sources import pack
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.runtime.protocol import InvocationError
from serveless.store import JobLayout, Store


class Recording:
    """A backend that runs nothing: it answers each call at once, as asked, and keeps the
    order of the calls."""

    name = "recording"

    def __init__(self, fail: InvocationError | None = None):
        self.calls: list[tuple[str, int]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def describe(self) -> dict:
        return {"backend": self.name, "cpu_share": "n/a"}

    def invoke(self, fn: FunctionSpec, event: dict) -> InvocationResult:
        with self.lock:
            self.calls.append((event["record"], event["stage"]))
        if self.fail is not None:
            return InvocationResult(None, self.fail, False, 0.0, 1.0, None)
        return InvocationResult({"stage": event["stage"], "record": event["record"],
                                 "images": 2, "duration_ms": 1.0}, None, False, 0.0, 1.0, 1.0)

    def close(self) -> None:
        pass


@pytest.fixture
def job(tmp_path):
    image_folder(tmp_path / "imgs", per_class=4)  # 8 images: 4 records of 2
    pack(tmp_path / "imgs", Store(str(tmp_path / "recs")), "", 2)
    st = Store(str(tmp_path / "st"))
    spec = prepare_job(st, "p", save(tiny_classifier(), tmp_path / "tiny.onnx"),
                       cuts="r1,f", records=str(tmp_path / "recs"))
    assert spec.stages == 3 and len(spec.records) == 4
    return st, spec


def test_at_concurrency_1_each_record_is_carried_to_its_predictions_first(job):
    st, spec = job
    backend = Recording()
    assert run_job(st, spec, backend, concurrency=1, retries=0, progress=False).ok
    r = spec.records
    assert backend.calls == [(rec, k) for rec in r for k in range(3)]
    # record 0 reaches its predictions before record 1 starts stage 1
    assert backend.calls.index((r[0], 2)) < backend.calls.index((r[1], 1))


def test_resume_starts_each_record_after_the_deepest_stage_the_store_holds(job):
    st, spec = job
    layout = JobLayout("p")
    r = spec.records
    rows = []

    def done(record: str, stage: int) -> None:
        key = (layout.predictions(record) if stage == 2
               else layout.stage_output(stage, record))
        st.put_bytes(key, b"output of %d" % stage)
        if stage == 0:
            st.put_bytes(layout.record_meta(record), b"{}")
        rows.append({"stage": stage, "record": record, "attempt": 0, "call": f"{record}{stage}",
                     "started": 1.0, "memory_mb": 1769, "init_ms": 0.0, "duration_ms": 1.0,
                     "error": None, "output": {"key": "ignored", "size": st.size(key)}})

    done(r[0], 0)
    done(r[0], 1)  # r0: stages 0 and 1 done
    done(r[1], 0)  # r1: stage 0 done
    for k in range(3):
        done(r[3], k)  # r3: done
    st.put_bytes(f"{layout.log_prefix}/0-000000.jsonl",
                 "".join(json.dumps(x) + "\n" for x in rows).encode())
    backend = Recording()
    result = run_job(st, spec, backend, concurrency=1, retries=0, progress=False)
    assert result.ok
    assert backend.calls == [(r[0], 2), (r[1], 1), (r[1], 2), (r[2], 0), (r[2], 1), (r[2], 2)]


def test_a_retryable_failure_is_tried_exactly_retries_plus_one_times(job):
    st, spec = job
    backend = Recording(InvocationError("InstanceDied", "killed"))
    result = run_job(st, spec, backend, concurrency=1, retries=2, progress=False)
    assert len(result.failed_records) == 4
    assert all(n == 3 for n in [backend.calls.count((rec, 0)) for rec in spec.records])
    assert result.retried == 4 * 2
    assert "after 3 attempts" in result.failed_records[spec.records[0]]
    final = Recording(InvocationError("RecordError", "bad record", True, "deterministic"))
    result = run_job(st, spec, final, concurrency=1, retries=2, progress=False)
    assert len(final.calls) == 4 and result.retried == 0  # deterministic: never retried
