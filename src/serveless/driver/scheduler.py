"""The scheduler: every record's chain of stages, at most C invocations in flight.

Policy
------
A job is R records, each a chain of K stages: stage k of a record can run once stage k-1
of that record has written its output. The scheduler keeps every runnable (record, stage)
in one priority queue and starts the best of them whenever fewer than C invocations are in
flight. Best is the deepest stage first, then the record's place in the job:

- Deepest first consumes intermediate data early. A record that has reached stage 2 is
  carried to its predictions before another record starts stage 0, so the store holds
  intermediates of about C records at a time, not of all R, and the first predictions
  arrive after one record's chain rather than after every record's stage 0.
- Record order among equals keeps the run reproducible and the progress bar honest.

This is the order the paper's chains ran in (each record flows through all its functions)
and the order the simulator replays (planning/simulate.py), so a plan's prediction and the
measurement compare like with like.

Failures do not stop the job; each is handled by its kind (runtime/protocol.py):

- A refused call (TOO_MANY_REQUESTS, Lambda's 429) never ran and is not billed: it goes back
  into the queue after a jittered, growing delay, without spending a retry (up to
  MAX_THROTTLES per invocation).
- OUT_OF_MEMORY raises the stage's memory by OOM_RAISE, once per size (not once per call),
  saves it in job.json (a resumed job starts from the raised size), and retries.
- Anything retryable goes back with exponential backoff and jitter, up to `retries` times;
  a deterministic failure (a malformed record, a graph onnxruntime refuses) is not retried.
- A record that runs out of attempts is failed with its reason; the others go on.

State
-----
All of it lives on the driver's one scheduling thread: `heap` (runnable tasks, each with the
earliest time it may start), `inflight` (futures of the calls running on the pool's
threads, which only block in `backend.invoke`), `memory` (the current size per stage) and
the counters the summary reports. Every finished call becomes one log row before anything
else is decided, so a driver killed at any moment loses at most the calls in flight, and
resume (resume.py) starts each record after its deepest whole output.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ..backends import Backend, FunctionSpec, InvocationResult
from ..cost import MAX_MEMORY_MB, vcpus
from ..data.tensors import TensorFormat
from ..errors import JobError, StoreError
from ..runtime.protocol import OUT_OF_MEMORY, TOO_MANY_REQUESTS, Event, InvocationError, Metrics
from ..store import JobLayout, Store
from .lease import JobLease
from .log import InvocationLog, log_row, save_driver_requests
from .progress import Progress
from .resume import completed_stages, remove_stale_temporaries
from .spec import JobSpec

OOM_RAISE = 1.5
MAX_THROTTLES = 200  # per invocation, before the record fails as throttled


@dataclass(order=True)
class _Task:
    priority: tuple[int, int, float]
    record: str = field(compare=False)
    stage: int = field(compare=False)
    attempt: int = field(compare=False, default=0)
    not_before: float = field(compare=False, default=0.0)
    throttles: int = field(compare=False, default=0)


@dataclass
class JobResult:
    spec: JobSpec
    rows: list[dict[str, Any]]
    wall_s: float
    images: int
    failed_records: dict[str, str]
    image_errors: int
    memory: list[int]
    raised: dict[int, int]
    backend: dict[str, Any]
    retried: int = 0
    images_run: int = 0
    throttled: int = 0
    driver_requests: dict[str, int] = field(default_factory=dict)  # the job's, all runs

    @property
    def ok(self) -> bool:
        return not self.failed_records and not self.image_errors


def run_job(
    store: Store,
    spec: JobSpec,
    backend: Backend,
    concurrency: int = 2,
    retries: int = 3,
    progress: bool = True,
    rng: random.Random | None = None,
    keep_intermediates: bool = True,
    say: Callable[[str], None] | None = None,
    lease: JobLease | None = None,
) -> JobResult:
    """Serve every record through every stage; returns what happened, never loses a record.

    Intermediate outputs stay in the store (as in the paper, and for inspection) unless
    `keep_intermediates` is False: then a record's are deleted once its predictions are
    written, so a large job does not leave ~0.35 MB per image behind.

    The job's lease (lease.py) is held throughout: the caller's, or one taken here. A job
    another driver runs is refused before anything is written or invoked.
    """
    if concurrency < 1:
        raise JobError("--concurrency must be >= 1")
    requests_before = store.requests.copy()
    store.check()
    problem = getattr(backend, "store_problem", lambda url: None)(store.url)
    if problem:
        raise JobError(problem)
    own = lease is None
    held = lease or JobLease(store, spec.job, say).acquire()
    try:
        return _run(store, spec, backend, concurrency, retries, progress, rng,
                    keep_intermediates, say, held, requests_before)
    finally:
        if own:
            held.release()


def _run(store: Store, spec: JobSpec, backend: Backend, concurrency: int, retries: int,
         progress: bool, rng: random.Random | None, keep_intermediates: bool,
         say: Callable[[str], None] | None, lease: JobLease,
         requests_before: Any) -> JobResult:
    layout = JobLayout(spec.job)
    fmt = TensorFormat.from_dict(spec.format)
    remove_stale_temporaries(store, layout)
    log = InvocationLog(store, layout)
    rng = rng or random.Random()
    memory = list(spec.memory)
    raised: dict[int, int] = {}
    done_stage, recovered = completed_stages(store, layout, spec, log.rows)
    for row in recovered:  # calls whose rows a killed driver did not flush: counted again
        log.append(row)
    if recovered and say:
        say(f"recovered {len(recovered)} calls the log had lost from what they stored with "
            "their outputs")
    order = {r: i for i, r in enumerate(spec.records)}
    heap: list[_Task] = []
    for record in spec.records:
        nxt = done_stage.get(record, -1) + 1
        if nxt < spec.stages:
            heapq.heappush(heap, _Task((-nxt, order[record], 0.0), record, nxt))
    total = len(spec.records)
    finished = total - len(heap)
    if finished and say:
        say(f"resuming: {finished} of {total} records done")
    failed: dict[str, str] = {}
    retried = 0
    throttled = 0
    driver_requests: dict[str, int] = {}
    images_run = 0  # images served by this run (a resumed job has others before)
    t0 = time.perf_counter()
    bar = Progress(total, finished, enabled=progress)

    # the cores a function runs on: this machine's for local engines, None on a cloud,
    # where each function has the vCPUs of its memory size whatever the driver has
    cores = getattr(backend, "function_cores", lambda: os.cpu_count())()
    ephemeral_mb = backend.describe().get("ephemeral_mb")  # configured /tmp, when billed

    def fn_for(stage: int) -> FunctionSpec:
        mem = memory[stage]
        return FunctionSpec(stage=stage, memory_mb=mem, model_key=spec.stage_model_key(stage),
                            store=store.spec(), threads=_threads(mem, cores))

    def invoke(task: _Task, fn: FunctionSpec, call: str) -> tuple[InvocationResult, float]:
        started = time.time()
        event = Event(store=store.spec(), job=spec.job, stage=task.stage, stages=spec.stages,
                      record=task.record, memory_mb=fn.memory_mb, micro_batch=spec.micro_batch,
                      threads=fn.threads, format=fmt.to_dict(), size=spec.input_hw,
                      preprocess=spec.preprocess, model=fn.model_key, transform=spec.transform,
                      scores=spec.scores, classes=spec.classes, save_scores=spec.save_scores,
                      call=call, record_format=spec.record_format, label_key=spec.label_key,
                      output=spec.output)
        return backend.invoke(fn, event.to_dict()), started

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="serveless-invoke")
    inflight: dict[Future[tuple[InvocationResult, float]], tuple[_Task, FunctionSpec, str]] = {}
    try:
        while heap or inflight:
            if lease.lost:  # another driver has the job now: stop before doing its work twice
                raise JobError(lease.lost)
            now = time.monotonic()
            deferred = []
            while heap and len(inflight) < concurrency:
                task = heapq.heappop(heap)
                if task.not_before > now:
                    deferred.append(task)
                    continue
                fn = fn_for(task.stage)
                call = uuid.uuid4().hex
                inflight[pool.submit(invoke, task, fn, call)] = (task, fn, call)
            for task in deferred:
                heapq.heappush(heap, task)
            if not inflight:
                time.sleep(min(0.5, max(0.01, min(t.not_before for t in heap) - now)))
                continue
            done, _ = wait(inflight, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                task, fn, call = inflight.pop(fut)
                try:
                    result, started = fut.result()
                except Exception as exc:  # the backend itself failed (fds, spawn): retry
                    result, started = InvocationResult(
                        None, InvocationError(type(exc).__name__, str(exc)), False, 0.0,
                        0.0, None), time.time()
                row = log_row(task.stage, task.record, task.attempt, fn, result, started, call)
                if ephemeral_mb:
                    row["ephemeral_mb"] = int(ephemeral_mb)
                log.append(row)
                err = result.error
                if err is not None and err.type == TOO_MANY_REQUESTS \
                        and task.throttles < MAX_THROTTLES:
                    # backpressure: back off and ask again; not a failure, no retry spent
                    throttled += 1
                    delay = min(10.0, 0.05 * 2**min(task.throttles, 8)) * (0.5 + rng.random())
                    heapq.heappush(heap, _Task(task.priority, task.record, task.stage,
                                               task.attempt, time.monotonic() + delay,
                                               task.throttles + 1))
                    continue
                if err is None:
                    if task.stage == spec.stages - 1:
                        if not keep_intermediates:
                            _drop_intermediates(store, layout, spec, task.record, fmt)
                        finished += 1
                        images_run += int(Metrics.from_dict(result.metrics).images or 0)
                        bar.advance(images_run)
                    else:
                        nxt = task.stage + 1
                        heapq.heappush(heap, _Task((-nxt, order[task.record], 0.0),
                                                   task.record, nxt))
                    continue
                if (err.type == OUT_OF_MEMORY and fn.memory_mb == memory[task.stage]
                        and memory[task.stage] < MAX_MEMORY_MB):  # once per size, not per call
                    memory[task.stage] = min(MAX_MEMORY_MB, int(memory[task.stage] * OOM_RAISE))
                    raised[task.stage] = memory[task.stage]
                    spec.memory = list(memory)  # a resumed job starts from the raised size
                    spec.save(store)
                if task.attempt < retries and err.retryable:
                    retried += 1
                    delay = min(30.0, 0.2 * 2**task.attempt) * (0.5 + rng.random())
                    heapq.heappush(heap, _Task(task.priority, task.record, task.stage,
                                               task.attempt + 1, time.monotonic() + delay,
                                               task.throttles))
                else:
                    why = (f" (not retried: {err.why or 'deterministic'})"
                           if not err.retryable else f" (after {task.attempt + 1} attempts)")
                    failed[task.record] = f"stage {task.stage}: {err.type}: {err.message}{why}"
                    finished += 1
                    bar.advance(images_run)
    except BaseException:
        backend.close()  # stop every instance now; Ctrl-C leaves no process behind
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        log.close()
        bar.close()
        with contextlib.suppress(OSError, StoreError):
            driver_requests = save_driver_requests(store, layout, requests_before)
    final = _final_rows(log.rows, spec)
    return JobResult(
        spec=spec, rows=log.rows, wall_s=time.perf_counter() - t0,
        images=sum(int(r.get("images") or 0) for r in final), images_run=images_run,
        failed_records=failed,
        image_errors=sum(int(r.get("image_errors") or 0) for r in final),
        memory=memory, raised=raised, backend=backend.describe(), retried=retried,
        throttled=throttled, driver_requests=driver_requests,
    )


def _drop_intermediates(store: Store, layout: JobLayout, spec: JobSpec, record: str,
                        fmt: TensorFormat) -> None:
    """Clean-up only: a failure here leaves an object behind, it never fails the job."""
    keys = [layout.stage_output(k, record, fmt.suffix) for k in range(spec.stages - 1)]
    for key in [*keys, layout.record_meta(record)]:
        with contextlib.suppress(OSError, StoreError):
            store.delete(key)


def _threads(memory_mb: int, cores: int | None = None) -> int:
    """onnxruntime intra-op threads = the function's vCPUs, rounded up, at most the cores
    of the machine the function runs on (None: a cloud function, its vCPUs alone)."""
    n = math.ceil(vcpus(memory_mb))
    return max(1, min(n, cores) if cores else n)


def _final_rows(rows: list[dict[str, Any]], spec: JobSpec) -> list[dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["stage"] == spec.stages - 1 and r.get("error") is None:
            last[r["record"]] = r
    return list(last.values())
