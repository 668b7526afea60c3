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

The measurements run in a child process (probe.py) placed under the local backend's CPU
quota (`backends.local.isolation.InstanceLimits`: a cgroup of 1 vCPU, then one of 2 vCPUs)
with onnxruntime set to as many intra-op threads as vCPUs, exactly as a function instance
of that size runs.
Where no cgroup can be created the quota is not enforced and the calibration says so
(`cpu_control`); the times are then those of 1 and 2 threads on an unrestricted machine.

With a backend (`calibrate --backend local|lithops [--memory MB]`) the same measurements
(runtime/calibration.py, which the child runs too) run inside a function call on that
backend instead (calibrate_backend.py). Either way the file records where and how it was
measured (`measured_on`: this machine or the backend, its options, memory and vCPUs, the
CPU model the measuring process saw, how its CPU share was held, and which figure came
from where); files written before it lack the field and still load.
"""

from __future__ import annotations

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

from ..errors import CalibrationError
from ..runtime.protocol import CAL_BATCH
from .calibrate_backend import Measured, measure_on_backend

PROBE_MODULE = "serveless.planning.probe"
COLDSTART_MODULE = "serveless.runtime.coldstart"  # a fresh process importing a function's

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


# -- the parent ------------------------------------------------------------------------------


def _time_start(limits: Any) -> float:
    """ms from spawning a child, placed under `limits` as the local backend places an
    instance, until it has imported onnxruntime and the function module."""
    t_spawn = time.time()
    proc = subprocess.Popen([sys.executable, "-m", COLDSTART_MODULE, repr(t_spawn)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
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
        from ..data.records import iter_record
        from ..data.sources import find_records

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
        from ..data.samples import make_sample_images

        make_sample_images(folder, DECODE_IMAGES)
        paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
        sizes = [os.path.getsize(p) for p in paths]
        source = f"{len(paths)} generated sample photos (no --records given)"
    return paths, float(np.mean(sizes)) + RECORD_FRAMING_BYTES, source


def _save_external(model: Any, path: Path) -> int:
    import onnx

    from ..store.layout import DATA_SUFFIX

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + DATA_SUFFIX, size_threshold=1024)
    data = path.with_name(path.name + DATA_SUFFIX)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _quantized_blocks(blocks: list[Any], images: list[str], size: list[int],
                      quantize: str) -> list[Any]:
    """The blocks as `run --quantize` makes stages (serveless.model.quantize: static QDQ int8,
    calibrated on the fp32 chain's activations of the sampled images), so what is timed
    is what an int8 job runs."""
    from ..data.images import preprocess
    from ..errors import QuantizeError
    from ..model.quantize import check_settings, quantize_stages

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
              say: Any = None, quantize: str | None = None, backend: Any = None,
              memory_mb: int | None = None,
              backend_options: dict[str, Any] | None = None,
              keep: list[str] | None = None) -> dict[str, Any]:
    """Measure the model; the calibration as a JSON-safe dict. On this machine by default;
    with `backend` (a started Backend), inside a function call on it at `memory_mb`
    (default 1769 MB, 1 vCPU; `backend_options` only recorded). With `quantize` ('int8')
    the blocks measured are the int8 blocks `run --quantize` would run (the whole model's
    load time is then left out of the load-time fit). `keep`: cuts that must stay block
    boundaries (calibrate --keep: an embeddings job's tensor, a cut to plan with), beside
    a paper preset's."""
    from ..cost import MB_PER_VCPU
    from ..model.graph import input_hw
    from ..model.loading import load_model
    from ..model.partition import list_cuts, split
    from ..model.presets import PAPER_PRESET
    from ..store.bandwidth import measure_bandwidth
    from ..store.layout import bandwidth_probe_key

    say = say or (lambda _m: None)
    t_all = time.perf_counter()
    onnx_model = load_model(model)
    size = list(input_hw(onnx_model))
    cuts = list_cuts(onnx_model)
    valid = [c.name for c in cuts]
    unknown = [k for k in keep or [] if k not in valid]
    if unknown:
        raise CalibrationError(f"--keep {unknown[0]!r} is not a cut of {model}; its cuts: "
                               f"{', '.join(valid) or 'none'} (serveless partition MODEL "
                               "--list)")
    keep = [*PAPER_PRESET.get(str(model).lower(), []), *(keep or [])]
    bounds = choose_boundaries(cuts, keep)
    by_name = {c.name: c for c in cuts}
    say(f"{len(cuts)} valid cuts; calibrating {len(bounds) + 1} blocks")
    blocks = split(onnx_model, bounds)
    in_shape = _input_shape(onnx_model)
    # On a backend the whole model is not sent: it would double what the function fetches
    # and keeps on its disk (AlexNet: 233 MB more, against Lambda's 512 MB of /tmp), for
    # one more point of a load-time fit that every block already makes.
    whole_too = quantize is None and backend is None
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
        whole_bytes = _save_external(onnx_model, whole) if whole_too else 0
        del blocks
        (root / "paths").mkdir()
        cfg = {"blocks": cfg_blocks, "whole": str(whole) if whole_too else None,
               "images": images, "size": size, "min_s": min_s, "tmp": str(root / "paths")}
        if backend is None:
            m = _measure_here(cfg, say)
        else:
            m = measure_on_backend(backend, store, cfg, memory_mb or MB_PER_VCPU,
                                   backend_options or {}, say)
    for note in m.notes:
        say(note)
    bandwidth = m.store
    if bandwidth is None:
        say("store bandwidth")
        bandwidth = measure_bandwidth(store, bandwidth_probe_key())
    p1, p2 = m.phase1, m.phase2
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
        # the model output's bytes per image (float32): an embeddings job's vector width
        "output_bytes_per_image": p1["blocks"][-1]["bytes_out_per_image"],
        "decode_ms_per_image": p1["decode_ms_per_image"],
        "runtime_mb": m.ready["rss_mb"], "start_ms": float(m.ready["start_ms"]),
        "start_ms_runs": m.starts,
        "stage0_first_call_ms": p1["stage0_first_call_ms"],
        **{k: p1[k] for k in PATH_FIELDS if k in p1},
        "load_ms_fixed": max(0.0, float(icpt)), "load_ms_per_mb": max(0.0, float(slope)),
        "whole_load_ms": p1["whole_load_ms"], "whole_model_bytes": whole_bytes or None,
        "store": bandwidth, "cpu_control": m.cpu_control, "calibration_batch": CAL_BATCH,
        "measured_on": m.measured_on,
        "machine": {"cores": os.cpu_count(), "load_avg": list(os.getloadavg())},
        "seconds": time.perf_counter() - t_all,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _measure_here(cfg: dict[str, Any], say: Any) -> Measured:
    """The measurements on this machine: a child process (probe.py) under the local
    backend's cgroup CPU quota of 1 vCPU, then 2 vCPUs."""
    from ..backends.local.isolation import InstanceLimits

    lim1 = InstanceLimits.create("calibrate-1vcpu", CAL_MEMORY_MB, 1.0)
    lim2 = InstanceLimits.create("calibrate-2vcpu", CAL_MEMORY_MB, 2.0)
    exact = lim1.cpu_exact and lim2.cpu_exact
    cpu_control = (f"cgroup CPU quota ({lim1.mode}: {lim1.reason}) and onnxruntime "
                   "intra-op threads = vCPUs" if exact else
                   f"onnxruntime intra-op threads only (1, then 2); no CPU quota: "
                   f"{lim1.reason}")
    t_spawn = time.time()
    proc = subprocess.Popen([sys.executable, "-m", PROBE_MODULE, repr(t_spawn)],
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
    function = ready.get("function", {})
    measured_on = {
        "where": "this machine", "backend": None, "backend_options": {}, "memory_mb": None,
        "vcpus": 1.0, "speedup_vcpus": 2.0, "cpu_model": function.get("cpu_model"),
        "cpu_count": function.get("cpu_count"), "cpu_quota": function.get("cpu_quota"),
        "function": function, "cpu_control": cpu_control, "cpu_share_enforced": exact,
        "scaled_to_1_vcpu": 1.0,
        "figures": {
            "blocks, decode, load, memory, function paths, speedup_2vcpu":
                "a child process of `calibrate` under a cgroup of 1, then 2 vCPUs",
            "start_ms": f"fresh processes under the 1 vCPU cgroup (median of {START_RUNS})",
            "runtime_mb": "the measuring child after its imports",
            "store": "one write and one read of 32 MB from the driver",
        },
    }
    return Measured(ready={"start_ms": float(np.median(starts)), "rss_mb": ready["rss_mb"]},
                    phase1=p1, phase2=p2, starts=starts, cpu_control=cpu_control,
                    measured_on=measured_on)


def _input_shape(model: Any) -> list[int]:
    from ..model.graph import check_image_model

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
    where = cal.get("measured_on")  # optional: files written before it lack it
    if where is not None and not (isinstance(where, dict)
                                  and where.get("where") in ("this machine", "backend")):
        raise CalibrationError(f"{source}: field 'measured_on' must be an object whose "
                               "'where' is 'this machine' or 'backend'")
    if isinstance(where, dict) and where.get("where") == "backend" and not (
            isinstance(where.get("backend"), str)
            and isinstance(where.get("memory_mb"), int) and where["memory_mb"] > 0):
        raise CalibrationError(f"{source}: a calibration measured on a backend must name it "
                               "and its memory_mb in 'measured_on'")
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
