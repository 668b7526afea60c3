"""The calibration's measurements, made where a function runs: every block of a model
loaded, timed and measured as a function would run it.

Two callers, one code. On this machine (`serveless calibrate`), planning/probe.py runs
`phase1` and `phase2` in a child process placed under the local backend's CPU quota of 1,
then 2 vCPUs. On a backend (`serveless calibrate --backend`), `serve` is the function side
of a calibration call (`protocol.CalibrationEvent`; `handler.handle` hands it over by its
kind): it downloads the blocks and sample images the driver uploaded, runs the same
phases inside the function instance at its memory and CPU share, and answers a
`CalibrationAnswer` (JSON, no pickle). Keeping one implementation is what makes the two
calibrations comparable figure by figure.

Times are medians of ROUNDS passes over all the blocks, in the model's order (each block
on its predecessor's output, so that it meets the caches as inside a stage), with stage
0's decode of the sample images in every pass: a burst of other load spoils one pass
rather than every run of one block. In a function call each timed sample is a window of
repeated runs (`window_s`, protocol.CAL_WINDOW_S): a fractional CPU quota throttles in
periods, which a single short run mostly misses.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..model.sessions import open_stage
from .memory import reset_rss_peak as reset_peak
from .memory import rss_mb
from .memory import rss_peak_mb as peak_mb
from .protocol import CAL_BATCH, CalibrationAnswer, CalibrationEvent

ROUNDS = 5  # timing passes over all blocks: a burst of other load spoils one, not all
BATCH_RUNS = 4  # at most, per block per pass, at the calibration batch
START_RUNS = 3  # fresh processes timed (the first after a while pays for a cold file cache)
COLDSTART_MODULE = "serveless.runtime.coldstart"  # spawned by name: it imports the handler


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


def _windowed(fn: Callable[[], Any], window_s: float) -> tuple[float, Any]:
    """Seconds per call of `fn`, called until `window_s` elapsed (once at least), and its
    last result."""
    t0 = time.perf_counter()
    n = 0
    while True:
        out = fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
            return elapsed / n, out


def _chain_times(kept: list[tuple[Any, str, np.ndarray]], batch: int, max_runs: int,
                 min_s: float = 0.0, window_s: float = 0.0) -> list[float]:
    """Seconds per run of each block, timed as the blocks run in the model: each on the
    output of the one before, block 0 on its sample input. Median of the samples, taken
    until min_s elapsed or max_runs (at least one). A sample is one pass over the blocks,
    or as many passes as fill `window_s`, each block's time their mean: whole passes, not
    one block repeated, so that a block still meets the caches as inside a stage, and a
    throttle of the CPU quota falls on each block in proportion to its CPU time."""
    times: list[list[float]] = [[] for _ in kept]
    t0 = time.perf_counter()
    while True:
        sums = [0.0] * len(kept)
        passes = 0
        t_window = time.perf_counter()
        while True:
            y = kept[0][2][:batch]
            for k, (sess, name, x) in enumerate(kept):
                if y.shape[1:] != x.shape[1:] or y.dtype != x.dtype:
                    y = x[:batch]  # not the next block's input (a model whose cut is not it)
                t1 = time.perf_counter()
                y = sess.run(None, {name: y})[0]
                sums[k] += time.perf_counter() - t1
            passes += 1
            if time.perf_counter() - t_window >= window_s:
                break
        for k, s in enumerate(sums):
            times[k].append(s / passes)
        if time.perf_counter() - t0 >= min_s or len(times[0]) >= max_runs:
            return [float(np.median(t)) for t in times]


def phase1(cfg: dict[str, Any]) -> dict[str, Any]:
    """At 1 thread (1 vCPU): load, time and memory of every block; decode of the images;
    the function's own code around the model. `cfg`: blocks [{path, input_shape}], whole
    (a path or None), images (paths), size, min_s, tmp (a scratch folder), window_s."""
    window = float(cfg.get("window_s", 0.0))
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
        rss0 = rss_mb()
        reset_peak()
        t0 = time.perf_counter()
        sess = open_stage(b["path"], 1)
        load_ms = (time.perf_counter() - t0) * 1000
        load_peak = max(0.0, peak_mb() - rss0)
        name = sess.get_inputs()[0].name
        weights = max(0.0, rss_mb() - rss0)
        _time_runs(sess, name, x[:1], 0.0, 1)  # warm-up
        rss1 = rss_mb()
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

    def decode_all() -> int:
        ok = 0
        for i, data in enumerate(images):
            try:
                preprocess(data, cfg["size"], out=batch[i])
                ok += 1
            except ValueError:
                pass
        return ok

    budget = cfg["min_s"] * len(kept) / ROUNDS  # seconds of batch passes per round
    for _ in range(ROUNDS):
        b1s_r = _chain_times(kept, 1, 3, window_s=window)
        bcs_r = _chain_times(kept, CAL_BATCH, BATCH_RUNS, budget, window)
        for k in range(len(kept)):
            b1s[k].append(b1s_r[k] * 1000)
            bcs[k].append(bcs_r[k] * 1000 / CAL_BATCH)
        seconds, ok = _windowed(decode_all, window)
        if ok:
            decode.append(seconds * 1000 / ok)
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
    """CPU ms, at this process's quota, of what a function does around the model, timed on
    the function's own code: parsing a record (beside decoding its images), writing an
    intermediate (cast, CRC32C, the store's file write) and reading one back, and writing
    predictions. Medians of ROUNDS runs (each a window of `window_s`)."""
    from ..data.records import Example, count_examples, iter_record, write_record
    from ..data.tensors import TensorFormat
    from ..store import Store
    from .counters import Counters
    from .inputs import tensor_blocks
    from .outputs import write_predictions, write_tensor

    window = float(cfg.get("window_s", 0.0))

    def median_ms(fn: Any) -> float:
        return float(np.median([_windowed(fn, window)[0] * 1000 for _ in range(ROUNDS)]))

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


def phase2(cfg: dict[str, Any]) -> dict[str, Any]:
    """At 2 threads (2 vCPUs): compute time per block at the calibration batch."""
    window = float(cfg.get("window_s", 0.0))
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
        for k, t in enumerate(_chain_times(kept, CAL_BATCH, BATCH_RUNS, budget, window)):
            times[k].append(t * 1000 / CAL_BATCH)
    return {"ms_per_image_2": [float(np.median(t)) for t in times]}


# -- where the measurements ran ---------------------------------------------------------------


def cpu_model() -> str:
    """The CPU as this process sees it: /proc/cpuinfo's "model name" (x86), else its
    "CPU part"/"Hardware" lines (arm64 names no model), else what Python knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for key in ("model name", "Hardware", "CPU part"):
        for line in lines:
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip() if key == "model name" else f"{key} {value.strip()}"
    return platform.processor() or platform.machine() or "unknown"


def describe_function() -> dict[str, Any]:
    """Where the measurements ran, as the process saw itself: its CPU, the cores it may use,
    its cgroup's CPU quota (None when it has none), the machine and Python."""
    from ..cgroups import cpu_quota

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "cpu_quota": cpu_quota(), "machine": platform.machine(),
            "python": platform.python_version()}


def fresh_starts(runs: int = START_RUNS) -> list[dict[str, float]]:
    """`runs` fresh processes importing what a function imports, timed from their spawn:
    [{start_ms, rss_mb}], in this process's cgroup (its CPU share) as a child is."""
    out = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-m", COLDSTART_MODULE, repr(time.time())],
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode == -9:  # in a capped instance, the OOM killer's signal
            raise MemoryError("a fresh process of the function was killed (SIGKILL) while "
                              "importing its modules: out of memory")
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(f"a fresh process of the function failed to start "
                               f"({proc.returncode}): {proc.stderr.strip()[-500:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# -- the calibration call ----------------------------------------------------------------------


def serve(event: dict[str, Any]) -> dict[str, Any]:
    """The function side of a calibration call: what the event asks measured, here, at this
    instance's CPU share; the answer as JSON (`CalibrationAnswer`)."""
    from ..store import Store
    from ..store.bandwidth import measure_bandwidth

    t0 = time.perf_counter()
    reset_peak()
    ev = CalibrationEvent.parse(event)
    answer = CalibrationAnswer(function={**describe_function(), "memory_mb": ev.memory_mb})
    store = Store.from_spec(ev.store)
    if "start" in ev.measure:  # first: nothing of this call's has touched the page cache
        answer.starts = fresh_starts()
    with tempfile.TemporaryDirectory(prefix="serveless-calibration-") as tmp:
        root = Path(tmp)
        cfg = _download(store, ev, root) if {"blocks", "speedup"} & set(ev.measure) else {}
        if "blocks" in ev.measure:
            answer.phase1 = phase1(cfg)
        if "speedup" in ev.measure:
            answer.phase2 = phase2(cfg)
    if "store" in ev.measure:
        answer.store = measure_bandwidth(store, ev.bandwidth_key)
    answer.seconds = time.perf_counter() - t0
    answer.peak_mb = round(peak_mb(), 1)
    return answer.to_dict()


def _download(store: Any, ev: CalibrationEvent, root: Path) -> dict[str, Any]:
    """The blocks and images into `root`, under their own names (a block's weights are
    found by the name its graph gives them: the graph's own name + .data); phase1's
    config over them."""
    blocks = []
    for b in ev.blocks:
        path = root / b["key"].rsplit("/", 1)[-1]
        store.get_file(b["key"], path)
        if b.get("data"):
            store.get_file(b["data"], root / b["data"].rsplit("/", 1)[-1])
        blocks.append({"path": str(path), "input_shape": b["input_shape"]})
    (root / "images").mkdir()
    images = []
    for i, key in enumerate(ev.images):
        path = root / "images" / f"img-{i}"
        path.write_bytes(store.get_bytes(key))
        images.append(str(path))
    (root / "paths").mkdir()
    return {"blocks": blocks, "whole": None, "images": images, "size": ev.size,
            "min_s": ev.min_s, "tmp": str(root / "paths"), "window_s": ev.window_s}
