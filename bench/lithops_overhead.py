"""Per-call overhead of the stage model on Lithops' localhost engine, with and without the
functions' disk cache of stage files (issue 13, item 1).

    python bench/lithops_overhead.py [--calls 6] [--stage 3] [--images 10]

Lithops runs each call in a fresh process (on Lambda too: its handler starts a process per
call), so the onnxruntime session never survives a call: every call loads its stage. The
store is moto's S3 server on 127.0.0.1 (tests/s3server.py). For each mode the same stage
runs `--calls` times, one at a time, on one record; printed per mode: where the model came
from, the handler's init (model fetch + session), and the Lithops call's wall time. The
first call of the cached mode fills the cache (it reads the store) and is left out of the
cached means, as a warm Lambda container's later calls would see it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine, save, workload  # noqa: E402
from s3server import start_s3_server  # noqa: E402

from serveless.backends import FunctionSpec, make_backend  # noqa: E402
from serveless.driver.prepare import prepare_job
from serveless.runtime.protocol import MODEL_CACHE_ENV
from serveless.store import Store  # noqa: E402


def run_mode(store: Store, spec, stage: int, calls: int, cache: bool) -> list[dict]:
    """`calls` calls of one stage on one record, each a fresh Lithops process."""
    if cache:
        os.environ.pop(MODEL_CACHE_ENV, None)  # the default: under the sidecar's TMPDIR
    else:
        os.environ[MODEL_CACHE_ENV] = "0"
    backend = make_backend("lithops", {"backend": "localhost"})
    out = []
    try:
        fn = FunctionSpec(stage=stage, memory_mb=spec.memory[stage],
                          model_key=spec.stage_model_key(stage), store=store.spec())
        event = {"store": store.spec(), "job": spec.job, "stage": stage,
                 "stages": spec.stages, "record": spec.records[0], "size": spec.input_hw,
                 "model": fn.model_key}
        for _ in range(calls):
            t0 = time.perf_counter()
            res = backend.invoke(fn, event)
            wall = (time.perf_counter() - t0) * 1000
            if not res.ok:
                raise SystemExit(f"call failed: {res.error}")
            out.append({"source": res.metrics["model_source"], "init_ms": res.init_ms,
                        "duration_ms": res.duration_ms, "wall_ms": wall,
                        "bytes_in": res.metrics["bytes_in"]})
    finally:
        backend.close()
        os.environ.pop(MODEL_CACHE_ENV, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--stage", type=int, default=3, help="3: AlexNet's classifier, 234 MB")
    ap.add_argument("--images", type=int, default=10)
    args = ap.parse_args()
    _, records = workload(args.images, args.images, seed=5)
    s3 = start_s3_server()
    try:
        store = Store(s3.url("bench"), s3.options())
        spec = prepare_job(store, "overhead", "alexnet", preset="paper", records=str(records))
        # the stage's input must exist: run the stages before it once, in this process
        from serveless.runtime.handler import handle

        for k in range(args.stage):
            handle({"store": store.spec(), "job": spec.job, "stage": k,
                             "stages": spec.stages, "record": spec.records[0],
                             "size": spec.input_hw, "model": spec.stage_model_key(k)})
        results = {}
        for mode, cache in (("before (no disk cache)", False), ("after (disk cache)", True)):
            rows = run_mode(store, spec, args.stage, args.calls, cache)
            measured = rows[1:] if cache else rows
            results[mode] = {
                "sources": dict(Counter(r["source"] for r in rows)),
                "init_ms_mean": statistics.mean(r["init_ms"] for r in measured),
                "wall_ms_mean": statistics.mean(r["wall_ms"] for r in measured),
                "bytes_in_mean": statistics.mean(r["bytes_in"] for r in measured),
                "calls": rows,
            }
            r = results[mode]
            print(f"{mode:24s} sources {r['sources']}  init {r['init_ms_mean']:8.0f} ms  "
                  f"call wall {r['wall_ms_mean']:8.0f} ms  bytes in "
                  f"{r['bytes_in_mean'] / 1e6:7.1f} MB")
        before, after = results["before (no disk cache)"], results["after (disk cache)"]
        print(f"per-call init saved: {before['init_ms_mean'] - after['init_ms_mean']:.0f} ms "
              f"({after['init_ms_mean'] / before['init_ms_mean']:.2f}x); call wall "
              f"{after['wall_ms_mean'] / before['wall_ms_mean']:.2f}x  [{machine()}]")
        save("lithops_overhead", {"args": vars(args), "machine": machine(), **results})
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
