"""The calibration's measuring process: a child placed under a function's CPU quota that
times, and measures the memory of, each block of a model, as a function would run it.

`python -m serveless.planning.probe T0 [start]`. The parent (calibrate.py) writes the
config (the block files, the sample images) as one JSON line on stdin, then the commands
`phase1` (at 1 vCPU: load, time and memory of every block; stage 0's decode; the
function's own code around the model) and `phase2` (at 2 vCPUs: compute per block), and
reads one JSON line back for each. With `start`, the child only reports how long a fresh
process took to import onnxruntime and the function's code: part of every cold start.

It runs apart from the parent because the parent cannot be placed under a CPU quota
without slowing everything else it does, and because a fresh process is what a function
is: imports, page faults and arenas are counted as they are in a cold instance.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..model.sessions import open_stage

CAL_BATCH = 32  # the default micro-batch: a stage at it needs no extrapolation
ROUNDS = 5  # timing passes over all blocks: a burst of other load spoils one, not all
BATCH_RUNS = 4  # at most, per block per pass, at the calibration batch


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _time_runs(sess: Any, name: str, x: np.ndarray, min_s: float, max_runs: int) -> float:
    """Seconds of the median run, repeated until min_s elapsed (at least one run)."""
    out = sess.get_outputs()[0].name
    t0, times = time.perf_counter(), []
    while True:
        t1 = time.perf_counter()
        sess.run([out], {name: x})
        times.append(time.perf_counter() - t1)
        if time.perf_counter() - t0 >= min_s or len(times) >= max_runs:
            return float(np.median(times))


def _chain_times(kept: list[tuple[Any, str, np.ndarray]], batch: int, max_runs: int,
                 min_s: float = 0.0) -> list[float]:
    """Seconds per run of each block, timed as the blocks run in the model: each on the
    output of the one before, block 0 on its sample input. Median of the passes, repeated
    until min_s elapsed or max_runs (at least one)."""
    times: list[list[float]] = [[] for _ in kept]
    t0 = time.perf_counter()
    while True:
        y = kept[0][2][:batch]
        for k, (sess, name, x) in enumerate(kept):
            if y.shape[1:] != x.shape[1:] or y.dtype != x.dtype:
                y = x[:batch]  # not the next block's input (a model whose cut is not it)
            t1 = time.perf_counter()
            y = sess.run(None, {name: y})[0]
            times[k].append(time.perf_counter() - t1)
        if time.perf_counter() - t0 >= min_s or len(times[0]) >= max_runs:
            return [float(np.median(t)) for t in times]


def _phase1(cfg: dict[str, Any]) -> dict[str, Any]:
    """At 1 vCPU: load, time and memory of every block; decode of the images."""
    from ..runtime.memory import reset_rss_peak as reset_peak
    from ..runtime.memory import rss_peak_mb as peak_mb

    # Stage 0's first call imports the decoders (images, records) and makes its first
    # decode: billed once per instance, on top of what a warm call costs.
    t0 = time.perf_counter()
    from ..data.images import preprocess
    first_image = Path(cfg["images"][0]).read_bytes() if cfg["images"] else None
    if first_image is not None:
        try:
            preprocess(first_image, cfg["size"])
        except ValueError:
            first_image = None
    first_decode_ms = (time.perf_counter() - t0) * 1000

    rng = np.random.default_rng(0)
    blocks, kept = [], []
    for b in cfg["blocks"]:
        x = rng.standard_normal([CAL_BATCH, *b["input_shape"]]).astype(np.float32)
        rss0 = _rss_mb()
        reset_peak()
        t0 = time.perf_counter()
        sess = open_stage(b["path"], 1)
        load_ms = (time.perf_counter() - t0) * 1000
        load_peak = max(0.0, peak_mb() - rss0)
        name = sess.get_inputs()[0].name
        weights = max(0.0, _rss_mb() - rss0)
        _time_runs(sess, name, x[:1], 0.0, 1)  # warm-up
        rss1 = _rss_mb()
        reset_peak()
        _time_runs(sess, name, x[:1], 0.0, 1)  # the peaks only: timed below, in order
        act1 = max(0.0, peak_mb() - rss1)
        reset_peak()
        _time_runs(sess, name, x, 0.0, 1)
        actc = max(0.0, peak_mb() - rss1)
        y = sess.run([sess.get_outputs()[0].name], {name: x[:2]})[0]
        out_width = int(np.prod(y.shape[1:]))
        blocks.append({
            "load_ms": load_ms, "weights_mb": weights, "load_peak_mb": load_peak,
            "act_mb_base": act1, "act_mb_per_image": max(0.0, (actc - act1) / (CAL_BATCH - 1)),
            "bytes_out_per_image": int(y.nbytes // 2),
        })
        kept.append((sess, name, x))
    # Timing passes run the blocks in the model's order, each on its predecessor's output:
    # a block then meets the caches as it does inside a stage. Timed alone and back to back,
    # a block whose weights fit in the L3 cache (fc8's 16 MB) kept them there and came out
    # up to 15% faster than the same layers inside a stage. Every pass also decodes each
    # sample image once, into a batch as the function does: drift of the machine's speed
    # (a shared host's, up to 10% within minutes) then hits blocks and decode alike.
    b1s: list[list[float]] = [[] for _ in kept]
    bcs: list[list[float]] = [[] for _ in kept]
    decode: list[float] = []
    images = [Path(p).read_bytes() for p in cfg["images"]]
    batch = np.empty((max(1, len(images)), 3, *cfg["size"]), np.float32)
    budget = cfg["min_s"] * len(kept) / ROUNDS  # seconds of batch passes per round
    for _ in range(ROUNDS):
        b1s_r = _chain_times(kept, 1, 3)
        bcs_r = _chain_times(kept, CAL_BATCH, BATCH_RUNS, budget)
        for k in range(len(kept)):
            b1s[k].append(b1s_r[k] * 1000)
            bcs[k].append(bcs_r[k] * 1000 / CAL_BATCH)
        ok = 0
        t0 = time.perf_counter()
        for i, data in enumerate(images):
            try:
                preprocess(data, cfg["size"], out=batch[i])
                ok += 1
            except ValueError:
                pass
        if ok:
            decode.append((time.perf_counter() - t0) * 1000 / ok)
    for blk, b1, bc in zip(blocks, b1s, bcs, strict=True):
        blk["ms_per_image_b1"] = float(np.median(b1))
        blk["ms_per_image"] = float(np.median(bc))
    # A function's first call runs a fresh session at its micro-batch (default 32): its
    # arenas grow and its kernels meet the shape. Measured jobs show 50-120 ms of CPU per
    # stage at 1 vCPU for a first call; a fresh session here shows 0-23 ms of it (the rest
    # is a fresh process's: its pages, which this child has already touched).
    for k, (blk, (_, name, x)) in enumerate(zip(blocks, kept, strict=True)):
        sess = open_stage(cfg["blocks"][k]["path"], 1)
        t0 = time.perf_counter()
        sess.run(None, {name: x})  # CAL_BATCH rows: the default micro-batch
        first = (time.perf_counter() - t0) * 1000
        blk["first_run_ms"] = max(0.0, first - blk["ms_per_image"] * len(x))
        del sess
    del kept
    whole_load_ms = None
    if cfg.get("whole"):
        t0 = time.perf_counter()
        sess = open_stage(cfg["whole"], 1)
        whole_load_ms = (time.perf_counter() - t0) * 1000
        del sess
    return {"blocks": blocks, "whole_load_ms": whole_load_ms,
            "decode_ms_per_image": float(np.median(decode)) if decode else 0.0,
            "stage0_first_call_ms": max(0.0, first_decode_ms - (float(np.median(decode))
                                                                 if first_image is not None
                                                                 and decode else 0.0)),
            **_function_paths(cfg, out_width)}


def _function_paths(cfg: dict[str, Any], classes: int, rows: int = 64) -> dict[str, float]:
    """CPU ms, at this child's quota, of what a function does around the model, timed on
    the function's own code: parsing a record (beside decoding its images), writing an
    intermediate (cast, CRC32C, the store's file write) and reading one back, and writing
    predictions. Medians of ROUNDS runs."""
    from ..data.records import Example, count_examples, iter_record, write_record
    from ..data.tensors import TensorFormat
    from ..runtime.counters import Counters
    from ..runtime.inputs import tensor_blocks
    from ..runtime.outputs import write_predictions, write_tensor
    from ..store import Store

    def median_ms(fn: Any) -> float:
        runs = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1000)
        return float(np.median(runs))

    out: dict[str, float] = {}
    images = [Path(p).read_bytes() for p in cfg["images"]]
    if images:
        rec = io.BytesIO()
        write_record(rec, [Example(images[i % len(images)], f"img-{i}.jpg", i % 10)
                           for i in range(rows)])

        def parse() -> None:
            rec.seek(0)
            count_examples(rec, "calibration")
            rec.seek(0)
            for _ in iter_record(rec, "calibration"):
                pass

        out["record_ms_per_image"] = median_ms(parse) / rows
    store = Store(cfg["tmp"])
    fmt = TensorFormat()
    width = 4096
    block = np.random.default_rng(1).standard_normal((32, width)).astype(np.float32)
    n = 16 * 2**20 // (4 * width)  # 16 MB stored as float32
    mb = n * width * 4 / 2**20
    out["write_ms_per_mb"] = median_ms(lambda: write_tensor(
        store, "calibration/tensor.npy", n, iter([block] * (n // 32)), fmt, Counters())) / mb
    path = store.path("calibration/tensor.npy")

    def read() -> None:
        with open(path, "rb") as f:
            for _ in tensor_blocks(f, fmt, 32, Counters())[1]:
                pass

    out["read_ms_per_mb"] = median_ms(read) / mb
    logits = np.random.default_rng(2).standard_normal((32, max(classes, 1))).astype(np.float32)
    meta = {"n": rows, "filenames": [f"img-{i}.jpg" for i in range(rows)],
            "labels": [-1] * rows, "errors": {}}
    out["predictions_ms_per_image"] = median_ms(lambda: write_predictions(
        store, "calibration/predictions.jsonl", "r0", iter([logits] * (rows // 32)), meta,
        Counters())) / rows
    return out


def _phase2(cfg: dict[str, Any]) -> dict[str, Any]:
    """At 2 vCPUs (2 intra-op threads): compute time per block at the calibration batch."""
    rng = np.random.default_rng(0)
    kept = []
    for b in cfg["blocks"]:
        x = rng.standard_normal([CAL_BATCH, *b["input_shape"]]).astype(np.float32)
        sess = open_stage(b["path"], 2)
        name = sess.get_inputs()[0].name
        _time_runs(sess, name, x[:1], 0.0, 1)
        kept.append((sess, name, x))
    times: list[list[float]] = [[] for _ in kept]
    budget = cfg["min_s"] * len(kept) / ROUNDS
    for _ in range(ROUNDS):  # in the model's order, as at 1 vCPU; the median counts
        for k, t in enumerate(_chain_times(kept, CAL_BATCH, BATCH_RUNS, budget)):
            times[k].append(t * 1000 / CAL_BATCH)
    return {"ms_per_image_2": [float(np.median(t)) for t in times]}


def main() -> None:
    """`python -m serveless.planning.probe`: the child. Reads its config and commands on
    stdin."""
    t_start = float(sys.argv[1]) if len(sys.argv) > 1 else time.time()
    import onnxruntime  # noqa: F401  (import time is part of a function's cold start)

    from ..runtime import handler  # noqa: F401

    if len(sys.argv) > 2 and sys.argv[2] == "start":  # only the start, timed again
        print(json.dumps({"start_ms": (time.time() - t_start) * 1000}), flush=True)
        return
    cfg = json.loads(sys.stdin.readline())
    print(json.dumps({"ready": True, "start_ms": (time.time() - t_start) * 1000,
                      "rss_mb": _rss_mb()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "phase1":
            print(json.dumps(_phase1(cfg)), flush=True)
        elif cmd == "phase2":
            print(json.dumps(_phase2(cfg)), flush=True)
        else:
            return


if __name__ == "__main__":
    main()
