"""Calibration: measure, on this machine, what the planner and the simulator need.

A model is cut into blocks at its valid cuts (adjacent blocks merged so there are at most
about 16); any stage the planner considers is a run of consecutive blocks, so per-block
figures add up to any stage's. Per block we measure compute ms per image at 1 vCPU (at
micro-batch 1 and `CAL_BATCH`, the default micro-batch, which gives a per-call overhead
for smaller ones), the speed-up at 2 vCPUs,
the memory its weights and activations take, and the bytes it writes per image; for the
whole job, stage 0's decode time per image on the user's own images, a model load time per
MB of weights, the time a fresh function process takes to start, and the store's bandwidth.

Times are medians of runs taken in ROUNDS passes over all the blocks, in the model's order
(each block on its predecessor's output, so that it meets the caches as inside a stage),
with stage 0's decode of the sample images in every pass: a burst of other
load on a shared machine spoils one pass rather than every run of one block, and a median,
unlike the fastest run, is what a job's functions see run after run (the fastest made the
simulation of local jobs 5-15% optimistic on a quiet machine). With 3 passes of at most 2
runs, AlexNet's whole-model time of two calibrations minutes apart differed by 10%; with
5 passes of up to 4 runs (BATCH_RUNS), three in a row agreed within 1% (about 11 s).

The measurements run in a child process placed under the local backend's CPU quota
(`backends.limits.InstanceLimits`: a cgroup of 1 vCPU, then one of 2 vCPUs) with onnxruntime
set to as many intra-op threads as vCPUs, exactly as a function instance of that size runs.
Where no cgroup can be created the quota is not enforced and the calibration says so
(`cpu_control`); the times are then those of 1 and 2 threads on an unrestricted machine.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CalibrationError
from .model.sessions import open_stage

CAL_BATCH = 32  # the default micro-batch: a stage at it needs no extrapolation
ROUNDS = 5  # timing passes over all blocks: a burst of other load spoils one, not all
BATCH_RUNS = 4  # at most, per block per pass, at the calibration batch
MAX_BLOCKS = 16
DECODE_IMAGES = 16
PRED_BYTES_PER_IMAGE = 260  # one predictions JSONL row (key, label, top-5 ids and scores)
RECORD_FRAMING_BYTES = 60  # TFRecord framing + Example fields around each image's bytes
CALIBRATION_KIND = "serveless-calibration"
CAL_MEMORY_MB = 8192  # the memory cap of the calibration child: high, so it is never the limit
START_RUNS = 3  # process starts timed (the first after a while pays for a cold file cache)
PATH_FIELDS = ("record_ms_per_image", "write_ms_per_mb", "read_ms_per_mb",
               "predictions_ms_per_image")
"""CPU ms of the function's own code around the model (`_function_paths`); optional in a
calibration file (older ones lack them: 0)."""


# -- blocks -------------------------------------------------------------------------------------


def choose_boundaries(cuts: list[Any], keep: list[str], max_blocks: int = MAX_BLOCKS) -> list[str]:
    """The cut tensors that separate blocks: all valid cuts, merged down to max_blocks.

    A cut whose next cut carries the same bytes per image (Conv then ReLU) is dropped first:
    cutting after the ReLU costs the same and saves nothing. Then the largest remaining cuts
    go (the most expensive to cross the store). Cuts in `keep` (a paper preset) always stay.
    """
    names = [c.name for c in cuts]
    size = {c.name: (c.bytes_per_sample if c.bytes_per_sample >= 0 else 1 << 40) for c in cuts}
    chosen = list(names)
    for a, b in zip(names, names[1:], strict=False):
        if len(chosen) <= max_blocks - 1:
            break
        if a not in keep and size[a] == size[b]:
            chosen.remove(a)
    while len(chosen) > max_blocks - 1:
        droppable = [n for n in chosen if n not in keep]
        if not droppable:
            break
        chosen.remove(max(droppable, key=lambda n: (size[n], names.index(n))))
    return chosen


@dataclass
class Block:
    """Blocks k covers the graph from boundary k-1 (the input for k=0) to boundary k."""

    index: int
    end: str  # the cut tensor it writes, or "" for the model's output
    ms_per_image_b1: float  # 1 vCPU, micro-batch 1
    ms_per_image: float  # 1 vCPU, micro-batch CAL_BATCH
    speedup_2vcpu: float
    weights_mb: float
    act_mb_base: float
    act_mb_per_image: float
    bytes_out_per_image: int
    load_ms: float
    model_bytes: int
    load_peak_mb: float  # above the process's memory before the load, at its highest
    first_run_ms: float = 0.0  # a fresh session's first run at batch 32, beyond warm runs


# -- the child process -------------------------------------------------------------------------


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
    from .runtime.memory import reset_rss_peak as reset_peak
    from .runtime.memory import rss_peak_mb as peak_mb

    # Stage 0's first call imports the decoders (images, records) and makes its first
    # decode: billed once per instance, on top of what a warm call costs.
    t0 = time.perf_counter()
    from .data.images import preprocess
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
    from .data.records import Example, count_examples, iter_record, write_record
    from .data.tensors import TensorFormat
    from .runtime.counters import Counters
    from .runtime.inputs import tensor_blocks
    from .runtime.outputs import write_predictions, write_tensor
    from .store import Store

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


def _worker() -> None:
    """`python -m serveless.calibrate`: the child. Reads its config and commands on stdin."""
    t_start = float(sys.argv[1]) if len(sys.argv) > 1 else time.time()
    import onnxruntime  # noqa: F401  (import time is part of a function's cold start)

    from .runtime import handler  # noqa: F401

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


# -- the parent ------------------------------------------------------------------------------


def _time_start(limits: Any) -> float:
    """ms from spawning a child, placed under `limits` as the local backend places an
    instance, until it has imported onnxruntime and the function module."""
    t_spawn = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "serveless.calibrate", repr(t_spawn),
                             "start"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            text=True)
    try:
        limits.attach(proc.pid)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not line:
        raise CalibrationError("a calibration process died while starting")
    return float(json.loads(line)["start_ms"])


def _sample_image_files(records: str | None, folder: Path) -> tuple[list[str], float, str]:
    """Up to DECODE_IMAGES of the user's images as files, the mean record bytes per image,
    and where they came from (sample photos when no records are given)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    sizes: list[int] = []
    if records:
        from .data.records import iter_record
        from .data.sources import find_records

        for src in find_records(records):
            with open(src, "rb") as f:
                for ex in iter_record(f, src):  # type: ignore[arg-type]
                    sizes.append(len(ex.encoded))
                    if len(paths) < DECODE_IMAGES:
                        p = folder / f"img-{len(paths)}"
                        p.write_bytes(ex.encoded)
                        paths.append(str(p))
            if len(sizes) >= 10 * DECODE_IMAGES:
                break
        if not sizes:
            raise CalibrationError(f"no images in the records at {records}")
        source = f"{len(sizes)} images of the records at {records}"
    else:
        from .data.samples import make_sample_images

        make_sample_images(folder, DECODE_IMAGES)
        paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
        sizes = [os.path.getsize(p) for p in paths]
        source = f"{len(paths)} generated sample photos (no --records given)"
    return paths, float(np.mean(sizes)) + RECORD_FRAMING_BYTES, source


def _store_bandwidth(store: Any, mb: int = 32) -> dict[str, float]:
    """MB/s of one write and one read of an `mb` MB object, and the ms of a small request."""
    from .store.layout import bandwidth_probe_key

    key = bandwidth_probe_key()
    data = np.random.default_rng(0).bytes(mb << 20)
    t0 = time.perf_counter()
    store.put_bytes(key, data)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = store.get_bytes(key)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.put_bytes(key, b"x")
    store.get_bytes(key)
    small_ms = (time.perf_counter() - t0) * 1000 / 2
    store.delete(key)
    if len(got) != len(data):
        raise CalibrationError("the store returned a different object than was written")
    return {"write_mb_s": mb / max(write_s, 1e-6), "read_mb_s": mb / max(read_s, 1e-6),
            "request_ms": small_ms, "url": store.url}


def _save_external(model: Any, path: Path) -> int:
    import onnx

    from .store.layout import DATA_SUFFIX

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + DATA_SUFFIX, size_threshold=1024)
    data = path.with_name(path.name + DATA_SUFFIX)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _quantized_blocks(blocks: list[Any], images: list[str], size: list[int],
                      quantize: str) -> list[Any]:
    """The blocks as `run --quantize` makes stages (serveless.model.quantize: static QDQ int8,
    calibrated on the fp32 chain's activations of the sampled images), so what is timed
    is what an int8 job runs."""
    from .data.images import preprocess
    from .errors import QuantizeError
    from .model.quantize import check_settings, quantize_stages

    try:
        check_settings(quantize, None, 1)
    except QuantizeError as exc:
        raise CalibrationError(str(exc)) from exc
    px = []
    for p in images:
        try:
            px.append(preprocess(Path(p).read_bytes(), tuple(size)))  # type: ignore[arg-type]
        except ValueError:
            continue
    if not px:
        raise CalibrationError("no image of the sample decodes: nothing to calibrate int8 on")
    return quantize_stages(blocks, np.stack(px))


def _qdq_nodes(model: Any) -> int:
    return sum(1 for n in model.graph.node
               if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def calibrate(model: str, store: Any, records: str | None = None, min_s: float = 0.25,
              say: Any = None, quantize: str | None = None) -> dict[str, Any]:
    """Measure the model on this machine; the calibration as a JSON-safe dict. With
    `quantize` ('int8') the blocks measured are the int8 blocks `run --quantize` would
    run (the whole model's load time is then left out of the load-time fit)."""
    from .backends.local.isolation import InstanceLimits
    from .model.graph import input_hw
    from .model.loading import load_model
    from .model.partition import list_cuts, split
    from .model.presets import PAPER_PRESET

    say = say or (lambda _m: None)
    t_all = time.perf_counter()
    onnx_model = load_model(model)
    size = list(input_hw(onnx_model))
    cuts = list_cuts(onnx_model)
    keep = [c for c in PAPER_PRESET.get(str(model).lower(), [])]
    bounds = choose_boundaries(cuts, keep)
    by_name = {c.name: c for c in cuts}
    say(f"{len(cuts)} valid cuts; calibrating {len(bounds) + 1} blocks")
    blocks = split(onnx_model, bounds)
    in_shape = _input_shape(onnx_model)
    with tempfile.TemporaryDirectory(prefix="serveless-calibrate-") as tmp:
        root = Path(tmp)
        images, record_bytes, source = _sample_image_files(records, root / "images")
        if quantize is not None:
            say(f"quantizing {len(blocks)} blocks ({quantize}) on {len(images)} images")
            blocks = _quantized_blocks(blocks, images, size, quantize)
        qdq = [_qdq_nodes(b) for b in blocks]
        cfg_blocks, model_bytes = [], []
        for k, blk in enumerate(blocks):
            path = root / f"block-{k}.onnx"
            model_bytes.append(_save_external(blk, path))
            shape = in_shape if k == 0 else list(by_name[bounds[k - 1]].shape)
            cfg_blocks.append({"path": str(path), "input_shape": shape})
        whole = root / "whole.onnx"
        whole_bytes = _save_external(onnx_model, whole) if quantize is None else 0
        del blocks
        (root / "paths").mkdir()
        cfg = {"blocks": cfg_blocks, "whole": str(whole) if quantize is None else None,
               "images": images, "size": size, "min_s": min_s, "tmp": str(root / "paths")}
        lim1 = InstanceLimits.create("calibrate-1vcpu", CAL_MEMORY_MB, 1.0)
        lim2 = InstanceLimits.create("calibrate-2vcpu", CAL_MEMORY_MB, 2.0)
        cpu_control = (f"cgroup CPU quota ({lim1.mode}: {lim1.reason}) and onnxruntime "
                       "intra-op threads = vCPUs" if lim1.cpu_exact and lim2.cpu_exact else
                       f"onnxruntime intra-op threads only (1, then 2); no CPU quota: "
                       f"{lim1.reason}")
        t_spawn = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "serveless.calibrate", repr(t_spawn)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            lim1.attach(proc.pid)
            assert proc.stdin is not None and proc.stdout is not None

            def ask(cmd: str) -> dict[str, Any]:
                proc.stdin.write(cmd + "\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise CalibrationError(f"the calibration process died ({proc.wait()})")
                return json.loads(line)

            ready = ask(json.dumps(cfg))
            say("1 vCPU: load, compute, memory per block; decode")
            p1 = ask("phase1")
            lim2.attach(proc.pid)
            say("2 vCPUs: compute per block")
            p2 = ask("phase2")
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
            starts = [ready["start_ms"], *(_time_start(lim1) for _ in range(START_RUNS - 1))]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            lim1.remove()
            lim2.remove()
    say("store bandwidth")
    bandwidth = _store_bandwidth(store)
    out_blocks = []
    for k, (m1, t2) in enumerate(zip(p1["blocks"], p2["ms_per_image_2"], strict=True)):
        out_blocks.append(Block(
            index=k, end=bounds[k] if k < len(bounds) else "",
            ms_per_image_b1=m1["ms_per_image_b1"], ms_per_image=m1["ms_per_image"],
            speedup_2vcpu=max(1.0, m1["ms_per_image"] / max(t2, 1e-9)),
            # RSS deltas under-count what an arena reuses; never below the bytes themselves
            weights_mb=max(m1["weights_mb"], model_bytes[k] / 2**20),
            act_mb_base=m1["act_mb_base"],
            act_mb_per_image=max(m1["act_mb_per_image"], (
                4 * math.prod(cfg_blocks[k]["input_shape"]) + m1["bytes_out_per_image"]) / 2**20),
            load_peak_mb=max(m1["load_peak_mb"], model_bytes[k] / 2**20),
            bytes_out_per_image=(m1["bytes_out_per_image"] if k < len(bounds)
                                 else PRED_BYTES_PER_IMAGE),
            load_ms=m1["load_ms"], model_bytes=model_bytes[k],
            first_run_ms=m1["first_run_ms"]).__dict__)
        out_blocks[-1]["qdq_nodes"] = qdq[k]  # > 0: the block timed was quantized
    # load ms = a + b × MB of weights, fitted on every block and the whole model
    whole_pt = [] if p1["whole_load_ms"] is None else [(whole_bytes, p1["whole_load_ms"])]
    xs = np.array([b["model_bytes"] / 2**20 for b in out_blocks]
                  + [w / 2**20 for w, _ in whole_pt])
    ys = np.array([b["load_ms"] for b in out_blocks] + [ms for _, ms in whole_pt])
    slope, icpt = (np.polyfit(xs, ys, 1) if len(xs) > 1 else (0.0, float(ys[0])))
    as_file = Path(str(model)).expanduser()
    name = str(as_file.resolve()) if as_file.is_file() else str(model)  # run --plan from anywhere
    return {
        "kind": CALIBRATION_KIND, "version": 1, "model": name, "input_hw": size,
        "quantize": quantize,
        "boundaries": bounds, "blocks": out_blocks,
        "input_bytes_per_image": record_bytes, "images_source": source,
        "decode_ms_per_image": p1["decode_ms_per_image"],
        "runtime_mb": ready["rss_mb"], "start_ms": float(np.median(starts)),
        "start_ms_runs": starts,
        "stage0_first_call_ms": p1["stage0_first_call_ms"],
        **{k: p1[k] for k in PATH_FIELDS if k in p1},
        "load_ms_fixed": max(0.0, float(icpt)), "load_ms_per_mb": max(0.0, float(slope)),
        "whole_load_ms": p1["whole_load_ms"], "whole_model_bytes": whole_bytes or None,
        "store": bandwidth, "cpu_control": cpu_control, "calibration_batch": CAL_BATCH,
        "machine": {"cores": os.cpu_count(), "load_avg": list(os.getloadavg())},
        "seconds": time.perf_counter() - t_all,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _input_shape(model: Any) -> list[int]:
    from .model.graph import check_image_model

    _, (c, h, w) = check_image_model(model)
    return [c, h, w]


# -- reading a calibration ---------------------------------------------------------------------


def validate(cal: Any, source: str = "calibration") -> dict[str, Any]:
    """Check the fields the planner and simulator read; CalibrationError names what is wrong."""
    if not isinstance(cal, dict) or cal.get("kind") != CALIBRATION_KIND:
        raise CalibrationError(f"{source} is not a serveless calibration "
                               f"(expected kind {CALIBRATION_KIND!r})")
    need = {"blocks": list, "boundaries": list, "decode_ms_per_image": (int, float),
            "runtime_mb": (int, float), "start_ms": (int, float), "store": dict,
            "load_ms_fixed": (int, float), "load_ms_per_mb": (int, float),
            "input_bytes_per_image": (int, float)}
    for key, typ in need.items():
        if not isinstance(cal.get(key), typ):
            raise CalibrationError(f"{source}: field {key!r} missing or of the wrong type")
    for key in (*PATH_FIELDS, "stage0_first_call_ms"):  # optional: older files lack them
        v = cal.get(key)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise CalibrationError(f"{source}: field {key!r} must be a number >= 0")
    if cal.get("quantize") not in (None, "int8"):
        raise CalibrationError(f"{source}: field 'quantize' must be null or 'int8'")
    blocks = cal["blocks"]
    if not blocks or len(blocks) != len(cal["boundaries"]) + 1:
        raise CalibrationError(f"{source}: {len(blocks)} blocks for "
                               f"{len(cal['boundaries'])} boundaries")
    fields = ("ms_per_image_b1", "ms_per_image", "speedup_2vcpu", "weights_mb", "act_mb_base",
              "act_mb_per_image", "bytes_out_per_image", "model_bytes")
    for k, b in enumerate(blocks):
        for f in fields:
            v = b.get(f) if isinstance(b, dict) else None
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CalibrationError(f"{source}: block {k} field {f!r} must be a number >= 0")
    return cal


def load_calibration(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"no calibration file at {p}; run `serveless calibrate MODEL`")
    try:
        return validate(json.loads(p.read_text()), str(p))
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{p} is not JSON: {exc}") from exc


if __name__ == "__main__":
    _worker()


# -- the performance model of a stage ----------------------------------------------------------

HEADROOM = 1.25
"""Memory must exceed the predicted peak by 25%: the model is built from per-block figures
and missed a whole stage 0's measured peak by 15% (138 vs 162 MB, AlexNet to pool5)."""


def _path(cal: dict[str, Any], key: str) -> float:
    return float(cal.get(key) or 0.0)


def calibration_batch(cal: dict[str, Any]) -> int:
    """The micro-batch a calibration timed its blocks at (16 before it was recorded)."""
    return int(cal.get("calibration_batch", 16))


def wall_ms_per_image(inp: Any, c1: Any, c: Any, out: Any, v: Any) -> Any:
    """Wall ms per image of a stage at v vCPUs from its CPU ms per image at 1 vCPU: `inp`
    on the input side (decode or read, on the prefetch thread), `c1` the model (`c` its wall
    time at v, by `speedup`), `out` on the output side (on the calling thread, after each
    micro-batch). Up to 1 vCPU everything shares the quota; above it, the two threads
    overlap and the slower one, or the quota, sets the pace."""
    v = np.asarray(v, dtype=float)
    vv = np.maximum(v, 1e-9)
    below = (inp + out) / vv + c
    above = np.maximum(np.maximum(inp, c + out), (inp + c1 + out) / vv)
    return np.where(v <= 1.0, below, above)


def speedup(vcpus: Any, s2: float) -> Any:
    """Speed-up over 1 vCPU at `vcpus`: proportional below 1 vCPU (a CPU quota), Amdahl's law
    above it with the parallel fraction that gives the measured speed-up `s2` at 2 vCPUs."""
    v = np.asarray(vcpus, dtype=float)
    p = min(1.0, max(0.0, 2.0 * (1.0 - 1.0 / max(s2, 1.0))))
    return np.where(v <= 1.0, v, 1.0 / ((1.0 - p) + p / np.maximum(v, 1e-9)))


@dataclass
class StageModel:
    """Blocks first..last (inclusive) of a calibration as one stage at micro-batch B."""

    cal: dict[str, Any]
    first: int
    last: int
    micro_batch: int

    @property
    def blocks(self) -> list[dict[str, Any]]:
        return self.cal["blocks"][self.first:self.last + 1]

    def _ms_at_batch(self, b: dict[str, Any]) -> float:
        """ms per image at 1 vCPU at this micro-batch: between 1 and the calibration batch,
        a per-call part shrinking as 1/B; above it, the calibration batch's figure. The 1/B
        law does not hold past it: a fully connected layer's weight reads, the per-call
        part at batch 1, overlap its arithmetic at larger batches. Extrapolated from 16 to
        32 it predicted AlexNet's FC stage 20% faster than it ran."""
        bc = float(calibration_batch(self.cal))
        t1, tc = b["ms_per_image_b1"], b["ms_per_image"]
        if self.micro_batch >= bc or bc <= 1:
            return float(tc)
        tinf = max(0.0, (bc * tc - t1) / (bc - 1))
        return tinf + max(0.0, t1 - tinf) / self.micro_batch

    def input_ms_per_image(self) -> float:
        """CPU ms per image at 1 vCPU on the input side (the prefetch thread): stage 0 parses
        its record and decodes; a later stage reads the intermediate tensor."""
        if self.first == 0:
            return float(self.cal["decode_ms_per_image"]) + _path(self.cal,
                                                                  "record_ms_per_image")
        return _path(self.cal, "read_ms_per_mb") * self.bytes_in_per_image / 2**20

    def output_ms_per_image(self) -> float:
        """CPU ms per image at 1 vCPU on the output side (after each micro-batch, on the
        calling thread): the intermediate tensor written, or the predictions."""
        if self.last == len(self.cal["blocks"]) - 1:
            return _path(self.cal, "predictions_ms_per_image")
        return _path(self.cal, "write_ms_per_mb") * self.bytes_out_per_image / 2**20

    def first_call_ms(self) -> float:
        """CPU ms at 1 vCPU that an instance's first call costs beyond a warm one: each
        block's first onnxruntime run, and stage 0's import of its decoders."""
        extra = sum(float(b.get("first_run_ms", 0.0)) for b in self.blocks)
        return extra + (_path(self.cal, "stage0_first_call_ms") if self.first == 0 else 0.0)

    def cpu_ms_per_image(self) -> float:
        """CPU work per image at 1 vCPU: the model, and its input and output sides."""
        c = sum(self._ms_at_batch(b) for b in self.blocks)
        return c + self.input_ms_per_image() + self.output_ms_per_image()

    def ms_per_image(self, vcpus: Any, cpu_factor: float = 1.0) -> Any:
        """Wall ms per image at `vcpus` (array or scalar); see `wall_ms_per_image`."""
        v = np.asarray(vcpus, dtype=float)
        c = sum(self._ms_at_batch(b) / speedup(v, b["speedup_2vcpu"]) for b in self.blocks)
        c1 = sum(self._ms_at_batch(b) for b in self.blocks)
        return wall_ms_per_image(self.input_ms_per_image(), c1, c,
                                 self.output_ms_per_image(), v) / cpu_factor

    def ms_per_record(self, images: int, vcpus: float, cpu_factor: float = 1.0) -> float:
        """Wall ms of a call on `images` images: full micro-batches, then the rest as one
        smaller batch, which pays a whole per-call part for fewer images (AlexNet's FC
        stage reads its 230 MB of weights for a last batch of 4 as for one of 32: 7% of a
        100-image record's time)."""
        full, rest = divmod(int(images), self.micro_batch)
        ms = full * self.micro_batch * float(self.ms_per_image(vcpus, cpu_factor))
        if rest:
            tail = StageModel(self.cal, self.first, self.last, rest)
            ms += rest * float(tail.ms_per_image(vcpus, cpu_factor))
        return ms

    @property
    def bytes_in_per_image(self) -> float:
        if self.first == 0:
            return float(self.cal["input_bytes_per_image"])
        return float(self.cal["blocks"][self.first - 1]["bytes_out_per_image"])

    @property
    def bytes_out_per_image(self) -> float:
        return float(self.blocks[-1]["bytes_out_per_image"])

    @property
    def model_bytes(self) -> int:
        return int(sum(b["model_bytes"] for b in self.blocks))

    def load_ms(self, vcpus: Any, cpu_factor: float = 1.0) -> Any:
        """Model load (session creation), measured at 1 vCPU, slower below 1 vCPU."""
        ms = self.cal["load_ms_fixed"] + self.cal["load_ms_per_mb"] * self.model_bytes / 2**20
        return ms / np.minimum(np.asarray(vcpus, dtype=float), 1.0) / cpu_factor

    def peak_mb(self) -> float:
        """Predicted peak memory of an instance: runtime + weights + the largest block's
        activations at this micro-batch + the prefetched next micro-batch; or the cold
        peak of the model load, whichever is higher. Independent of images per record:
        the function streams its input and output."""
        base = float(self.cal["runtime_mb"])
        weights = sum(b["weights_mb"] for b in self.blocks)
        act = max(b["act_mb_base"] + b["act_mb_per_image"] * self.micro_batch
                  for b in self.blocks)
        first_in = 4.0 * 3 * np.prod(self.cal.get("input_hw", [224, 224])) if self.first == 0 \
            else self.bytes_in_per_image
        prefetch = self.micro_batch * first_in / 2**20
        cold = sum(b.get("load_peak_mb", b["weights_mb"]) for b in self.blocks)
        return base + max(weights + act + prefetch, cold)

    def memory_needed(self) -> int:
        """The smallest memory size (MB) this stage is allowed: peak × HEADROOM."""
        return int(math.ceil(self.peak_mb() * HEADROOM))


def stage_ranges(cal: dict[str, Any], cuts: list[str]) -> list[tuple[int, int]]:
    """(first, last) block of each stage for cuts that are calibration boundaries."""
    bounds = list(cal["boundaries"])
    idx = []
    for c in cuts:
        if c not in bounds:
            raise CalibrationError(f"cut {c!r} is not a block boundary of the calibration "
                                   f"(boundaries: {', '.join(bounds)})")
        idx.append(bounds.index(c))
    if idx != sorted(set(idx)):
        raise CalibrationError(f"cuts {cuts} are not in the model's order")
    ends = [*idx, len(cal["blocks"]) - 1]
    starts = [0, *[i + 1 for i in idx]]
    return list(zip(starts, ends, strict=True))


def stage_models(cal: dict[str, Any], cuts: list[str], micro_batch: int) -> list[StageModel]:
    return [StageModel(cal, a, b, micro_batch) for a, b in stage_ranges(cal, cuts)]
