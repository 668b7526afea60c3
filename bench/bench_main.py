"""The main benchmark (issues 7, 14): serveless on the local backend vs a plain script, one run.

    python bench/bench_main.py [--images 3000] [--per-record 1000] [--rounds 2]

(a) plain: the script a skilled engineer would write: the JPEGs decoded on a thread pool
    (the same decoder as stage 0, serveless.data.images.preprocess) overlapped with the whole
    model in one onnxruntime session on all cores, batch 32; (a2) the other one: a process
    per core, each decoding its share and running the model on one thread. Every ratio is
    taken against the faster of the two;
(b) serveless: the paper preset on the local backend, concurrency 2, default memory;
    images/s of the job (run_job), and of the whole command (prepare_job + run_job: model
    load, partition, equivalence check, upload of stages and records), in a fresh store
    (after the first job, the stages come from this machine's cache of checked sets, with no
    partition or check, as for a user's second store; SERVELESS_STAGE_CACHE=0 to pay them);
(b2) serveless at the configuration a user would pick for throughput on this machine (by
    default the whole model as one stage, 1769 MB = 1 vCPU per function, concurrency 2,
    records of images / concurrency so no function runs alone at the end; --best-*), its
    whole command in a fresh store and with the stage models already in the store;
(c) the floor: the whole model alone in onnxruntime at 1 thread, batch 32, on random
    inputs (ms/image, priced as if billed at 1 vCPU), and stage 0's decode alone (ms/image,
    1 thread); the modeled cost of (b) is compared with floor + decode.
a, b, c alternate (a, b, c, a, b, c, …) so drift in the machine's speed hits all alike;
ratios are taken within one run. The CPU and its flags are printed with the figures:
onnxruntime's kernels, and so every number here, depend on them. Then the size and
time of each intermediate format, and the setup time of a second job that reuses the
stage models. The goals on images/s are read on (b2); (b) is the paper's configuration, as
the cost goals are (records of --per-record; --cuts prices other cuts, by default the whole
model as one stage), with each stage's billed ms per image split into init, read, compute
and write.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, at_scale, cpu, machine, save, workload  # noqa: E402

from serveless.backends.local import LocalBackend  # noqa: E402
from serveless.cost import LAMBDA_GB_SECOND, MB_PER_VCPU, gb_seconds, vcpus  # noqa: E402
from serveless.data.images import preprocess
from serveless.data.tensors import TensorFormat
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.model.builtins import build_alexnet
from serveless.report.summary import summarize
from serveless.store import Store  # noqa: E402

BATCH = 32


def session(model_bytes: bytes | str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spinning threads would take the CPU the decode threads need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def overlapped(files: list[Path], consume: Callable[[np.ndarray], None],
               batch: int = BATCH) -> float:
    """Images/s of decoding `files` on a thread pool of all cores, overlapped with
    `consume` (the model) on each batch as it is ready, two batches ahead at most."""
    cores = os.cpu_count() or 1
    batches: queue.Queue = queue.Queue(maxsize=2)  # decoded batches waiting for the model

    def decode_into(x: np.ndarray, j: int, path: Path) -> None:
        preprocess(path.read_bytes(), out=x[j])

    def decode_all(pool: ThreadPoolExecutor) -> None:
        try:
            for i in range(0, len(files), batch):
                chunk = files[i:i + batch]
                x = np.empty((len(chunk), 3, 224, 224), np.float32)
                list(pool.map(decode_into, [x] * len(chunk), range(len(chunk)), chunk))
                batches.put(x)
            batches.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            batches.put(exc)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        producer = threading.Thread(target=decode_all, args=(pool,), daemon=True)
        producer.start()
        while (x := batches.get()) is not None:
            if isinstance(x, BaseException):
                raise x
            consume(x)
        producer.join()
    return len(files) / (time.perf_counter() - t0)


def plain(model_bytes: bytes, files: list[Path], batch: int = BATCH) -> float:
    """Images/s of the plain script: decode on a thread pool, overlapped with inference on
    all cores, the top-5 of every image."""
    sess = session(model_bytes, os.cpu_count() or 1)

    def top5(x: np.ndarray) -> None:
        (probs,) = sess.run(None, {"input": x})
        np.argsort(-probs, axis=1)[:, :5]

    return overlapped(files, top5, batch)


def _plain_worker(model_path: str, files: list[Path], ready, start, done) -> None:
    """One of (a2)'s processes: its share of the images, decoded and run on one thread."""
    sess = session(model_path, 1)
    x = np.empty((BATCH, 3, 224, 224), np.float32)
    sess.run(None, {"input": x})  # warm, like (a)'s session made before its clock starts
    ready.put(os.getpid())
    start.wait()
    for i in range(0, len(files), BATCH):
        chunk = files[i:i + BATCH]
        for j, path in enumerate(chunk):
            preprocess(path.read_bytes(), out=x[j])
        (probs,) = sess.run(None, {"input": x[:len(chunk)]})
        np.argsort(-probs, axis=1)[:, :5]
    done.put(len(files))


def plain_processes(model_path: str, files: list[Path]) -> float:
    """Images/s of (a2), the other script a skilled engineer would write on a CPU machine:
    one process per core, each decoding its share and running the model on one thread, so
    nothing is shared and no thread waits on another (what serveless's functions do)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    cores = os.cpu_count() or 1
    ready, done, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_plain_worker,
                         args=(model_path, files[k::cores], ready, start, done))
             for k in range(cores)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get()
    t0 = time.perf_counter()
    start.set()
    n = sum(done.get() for _ in procs)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    return n / elapsed


def floor_ms(model_bytes: bytes, batches: int = 4, batch: int = BATCH) -> float:
    """ms/image of the whole model alone, 1 thread, batch 32 (one warm-up batch first)."""
    sess = session(model_bytes, 1)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    sess.run(None, {"input": x})
    t0 = time.perf_counter()
    for _ in range(batches):
        sess.run(None, {"input": x})
    return (time.perf_counter() - t0) * 1000 / (batches * batch)


def decode_ms(files: list[Path], limit: int = 300) -> float:
    """ms/image of stage 0's decode and preprocessing alone, 1 thread, bytes in memory."""
    datas = [f.read_bytes() for f in files[:limit]]
    out = np.empty((3, 224, 224), np.float32)
    t0 = time.perf_counter()
    for d in datas:
        preprocess(d, out=out)
    return (time.perf_counter() - t0) * 1000 / len(datas)


def serveless_run(rec_dir: Path, job: str, fmt: TensorFormat | None = None,
                  memory: str | None = None, concurrency: int = 2,
                  preset: str | None = "paper", cuts: str | None = None,
                  micro_batch: int | None = None, reuse_setup: bool = False,
                  output: str | None = None, tensor: str | None = None) -> dict:
    """One job in a fresh store: (setup) prepare_job, then run_job. With `reuse_setup`, the
    setup of a second job of the same model and cuts in that store (stage models found
    there, as for any run after the first) is timed too: `setup_reused_s`."""
    root = OUT / "stores" / job
    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    t0 = time.perf_counter()
    spec = prepare_job(store, job, "alexnet", cuts=cuts, preset=preset, records=str(rec_dir),
                       fmt=fmt, memory=memory, micro_batch=micro_batch, output=output,
                       tensor=tensor)
    setup = time.perf_counter() - t0
    reused = None
    if reuse_setup:
        t0 = time.perf_counter()
        prepare_job(store, job + "-again", "alexnet", cuts=cuts, preset=preset,
                    records=str(rec_dir), fmt=fmt, memory=memory, micro_batch=micro_batch)
        reused = time.perf_counter() - t0
    with LocalBackend() as backend:
        t1 = time.perf_counter()
        result = run_job(store, spec, backend, concurrency=concurrency, progress=False)
        wall = time.perf_counter() - t1
    assert result.ok, result.failed_records
    rows = result.rows
    inter = sum(r["bytes_out"] for r in rows if r["stage"] < spec.stages - 1)
    return {"images_per_s": result.images / wall, "wall_s": wall, "setup_s": setup,
            "command_images_per_s": result.images / (setup + wall), "rows": rows,
            "setup_reused_s": reused,
            "command_reused_images_per_s": None if reused is None else
            result.images / (reused + wall),
            "images": result.images, "intermediate_bytes": inter, "cpu": result.backend,
            "store": store, "spec": spec}


def vcpu_ms_per_image(rows: list[dict], images: int) -> float:
    """Billed time per image in 1-vCPU terms: what the cost is proportional to."""
    return sum(r["billed_ms"] * vcpus(r["memory_mb"]) for r in rows) / images


def per_million_at_1_vcpu(ms: float, arch: str = "x86_64") -> float:
    """$ per 1M images for `ms` of 1-vCPU function time per image (compute only)."""
    return gb_seconds(MB_PER_VCPU, ms) * LAMBDA_GB_SECOND[arch] * 1e6


def billed_parts(rows: list[dict], images: int) -> list[dict]:
    """Per stage, ms per image in 1-vCPU terms: billed, and in it the init of cold starts,
    the duration, and the function's own read / compute / write clocks (wall time on
    threads that overlap, so they need not add up to the duration), with cold starts."""
    parts = []
    for stage in sorted({r["stage"] for r in rows}):
        rs = [r for r in rows if r["stage"] == stage]
        per = {k: sum((r.get(k) or 0) * vcpus(r["memory_mb"]) for r in rs) / images
               for k in ("billed_ms", "init_ms", "duration_ms", "read_ms", "compute_ms",
                         "write_ms")}
        parts.append({"stage": stage, "invocations": len(rs),
                      "cold": sum(1 for r in rs if r.get("cold")), **per})
    return parts


def print_billed_parts(parts: list[dict]) -> None:
    print("    per stage, ms/image (1 vCPU): billed = init + duration (+ rounding); in the "
          "duration: read, compute, write")
    for p in parts:
        print(f"      stage {p['stage']}: billed {p['billed_ms']:5.2f} = init "
              f"{p['init_ms']:4.2f} ({p['cold']} cold of {p['invocations']}) + duration "
              f"{p['duration_ms']:5.2f}   read {p['read_ms']:5.2f}  compute "
              f"{p['compute_ms']:5.2f}  write {p['write_ms']:4.2f}")


def million(rows: list[dict], concurrency: int, floor_dec: float) -> dict:
    """Billed ms per image and $ per 1M of this job at 1M images (bench/common.at_scale:
    modeled from its measured calls, C cold calls per stage), printed and returned."""
    scaled = at_scale(rows, concurrency)
    x86, arm = summarize(scaled, "x86_64"), summarize(scaled, "arm64")
    ms = vcpu_ms_per_image(scaled, x86["images"])
    print(f"    at 1M images (modeled from these calls: {len(scaled) // len(x86['stages'])} "
          f"records, {concurrency} cold calls per stage): billed {ms:.2f} ms/image = "
          f"{ms / floor_dec:.3f} × (floor + decode), ${x86['per_million']:.3f} per 1M x86_64 "
          f"(arm64 ${arm['per_million']:.3f})")
    return {"billed_vcpu_ms_per_image": ms, "billed_over_floor": ms / floor_dec,
            "per_million_x86": x86["per_million"], "per_million_arm": arm["per_million"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--per-record", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--formats", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cuts", action="append", default=None,
                    help="other cuts to price at --per-record as well, e.g. pool2 or '' (one "
                         "stage, the default); repeatable")
    ap.add_argument("--best-cuts", default="",
                    help="(b2) the best configuration's cuts ('' = the whole model as one "
                         "stage, the default)")
    ap.add_argument("--best-memory", default="1769", help="(b2) MB per stage")
    ap.add_argument("--best-concurrency", type=int, default=2, help="(b2) concurrency")
    ap.add_argument("--best-per-record", type=int, default=0,
                    help="(b2) images per record; 0 (default): images / concurrency, so "
                         "every function serves one record and none runs alone at the end")
    ap.add_argument("--best-micro-batch", type=int, default=32, help="(b2) micro-batch")
    args = ap.parse_args()
    other_cuts = [""] if args.cuts is None else args.cuts
    best_per_record = args.best_per_record or -(-args.images // args.best_concurrency)
    best_label = (f"{'cuts ' + args.best_cuts if args.best_cuts else 'whole model'}, "
                  f"{args.best_memory} MB, C={args.best_concurrency}, records of "
                  f"{best_per_record}, micro-batch {args.best_micro_batch}")

    the_cpu = cpu()
    print(f"machine: {machine()}")
    image_dir, rec_dir = workload(args.images, args.per_record)
    _, best_dir = workload(args.images, best_per_record)
    files = sorted(image_dir.rglob("*.jpg"))
    model_bytes = build_alexnet().SerializeToString()
    base, base_procs, runs, bests, floors, decodes = [], [], [], [], [], []
    model_path = OUT / "plain-alexnet.onnx"
    model_path.write_bytes(model_bytes)
    for rnd in range(args.rounds):
        base.append(plain(model_bytes, files))
        print(f"round {rnd + 1}: (a) plain {base[-1]:.1f} images/s", flush=True)
        base_procs.append(plain_processes(str(model_path), files))
        print(f"round {rnd + 1}: (a2) plain, a process per core {base_procs[-1]:.1f} images/s",
              flush=True)
        run = serveless_run(rec_dir, f"bench-{rnd}")
        runs.append(run)
        print(f"round {rnd + 1}: (b) serveless, paper preset {run['images_per_s']:.1f} images/s "
              f"(whole command {run['command_images_per_s']:.1f}, setup {run['setup_s']:.1f} s)",
              flush=True)
        best = serveless_run(best_dir, f"best-{rnd}", memory=args.best_memory,
                             concurrency=args.best_concurrency, preset=None,
                             cuts=args.best_cuts or None, micro_batch=args.best_micro_batch,
                             reuse_setup=True)
        bests.append(best)
        print(f"round {rnd + 1}: (b2) serveless, {best_label}: {best['images_per_s']:.1f} "
              f"images/s (whole command {best['command_images_per_s']:.1f}, setup "
              f"{best['setup_s']:.1f} s; {best['command_reused_images_per_s']:.1f} with the "
              f"stage models in the store, setup {best['setup_reused_s']:.1f} s)", flush=True)
        floors.append(floor_ms(model_bytes))
        decodes.append(decode_ms(files))
        print(f"round {rnd + 1}: (c) floor {floors[-1]:.2f} ms/image, stage-0 decode "
              f"{decodes[-1]:.2f} ms/image", flush=True)
    med = statistics.median
    a_threads, a_procs = med(base), med(base_procs)
    a = max(a_threads, a_procs)  # the ratios are taken against the stronger plain script
    b = med(r["images_per_s"] for r in runs)
    cmd = med(r["command_images_per_s"] for r in runs)
    b2 = med(r["images_per_s"] for r in bests)
    cmd2 = med(r["command_images_per_s"] for r in bests)
    cmd2_reused = med(r["command_reused_images_per_s"] for r in bests)
    floor, dec = med(floors), med(decodes)
    rows, images = runs[-1]["rows"], runs[-1]["images"]
    x86, arm = summarize(rows, "x86_64"), summarize(rows, "arm64")
    billed = vcpu_ms_per_image(rows, images)
    limit = 1.15 * (floor + dec)

    print(f"\nCPU: {the_cpu}   ({args.images} images, medians of {args.rounds} rounds)")
    print(f"(a) plain script           {a_threads:7.1f} images/s   (threads, one session on "
          "all cores)")
    print(f"(a2) plain script          {a_procs:7.1f} images/s   (a process per core)")
    print(f"    ratios below are against the stronger: {a:.1f} images/s")
    print(f"(b) serveless job, paper preset, C=2, 1769 MB, records of {args.per_record} "
          f"({runs[-1]['cpu']['cpu_share']})")
    print(f"    job                    {b:7.1f} images/s   ratio job/plain {b / a:6.3f}")
    print(f"    whole command          {cmd:7.1f} images/s   ratio command/plain {cmd / a:6.3f}"
          f"   (setup in a fresh store: {med(r['setup_s'] for r in runs):.1f} s)")
    print(f"(b2) serveless job, best configuration: {best_label}")
    print(f"    job                    {b2:7.1f} images/s   ratio job/plain {b2 / a:6.3f}   "
          "goal >= 0.95")
    print(f"    whole command          {cmd2:7.1f} images/s   ratio command/plain "
          f"{cmd2 / a:6.3f}   goal >= 0.85   (setup in a fresh store: "
          f"{med(r['setup_s'] for r in bests):.1f} s)")
    print(f"    whole command          {cmd2_reused:7.1f} images/s   ratio command/plain "
          f"{cmd2_reused / a:6.3f}   (stage models already in the store: setup "
          f"{med(r['setup_reused_s'] for r in bests):.1f} s, timed on a second job of the "
          "same store, with this job's wall time)")
    for st in x86["stages"]:
        print(f"(b) stage {st.stage}: peak {st.peak_mb:6.0f} MB   mean {st.mean_duration_ms:8.0f} "
              f"ms   {st.gb_s:8.2f} GB-s")
    print(f"\nCPU: {the_cpu}   (cost: modeled, AWS Lambda prices; time: measured)")
    print(f"(c) floor: whole model, 1 thread, batch 32   {floor:6.2f} ms/image   "
          f"= ${per_million_at_1_vcpu(floor):.3f} per 1M at 1 vCPU (x86_64)")
    print(f"    stage-0 decode, 1 thread                 {dec:6.2f} ms/image")
    print(f"    floor + decode                           {floor + dec:6.2f} ms/image   "
          f"= ${per_million_at_1_vcpu(floor + dec):.3f} per 1M")
    print(f"(b) billed per image (1-vCPU ms)             {billed:6.2f} ms/image   "
          f"= {billed / (floor + dec):.3f} × (floor + decode)   goal <= 1.15 ({limit:.2f} ms)")
    print(f"    $ per 1M images (paper preset, records of {args.per_record}): x86_64 "
          f"{x86['per_million']:.3f}, arm64 {arm['per_million']:.3f}   goal x86_64 <= 0.40")
    parts = billed_parts(rows, images)
    print_billed_parts(parts)
    big = million(rows, 2, floor + dec)
    result = {"machine": machine(), "cpu": the_cpu, "images": args.images,
              "per_record": args.per_record, "plain": base, "plain_processes": base_procs,
              "serveless": [r["images_per_s"] for r in runs],
              "command": [r["command_images_per_s"] for r in runs],
              "setup_s": [r["setup_s"] for r in runs], "ratio": b / a,
              "ratio_command": cmd / a, "floor_ms": floors, "decode_ms": decodes,
              "billed_vcpu_ms_per_image": billed, "billed_over_floor": billed / (floor + dec),
              "billed_parts": parts, "at_1m": big,
              "peaks": {st.stage: st.peak_mb for st in x86["stages"]}, "gb_s": x86["gb_s"],
              "per_million_x86": x86["per_million"], "per_million_arm": arm["per_million"],
              "best": {"config": best_label, "serveless": [r["images_per_s"] for r in bests],
                       "command": [r["command_images_per_s"] for r in bests],
                       "command_reused": [r["command_reused_images_per_s"] for r in bests],
                       "setup_s": [r["setup_s"] for r in bests],
                       "setup_reused_s": [r["setup_reused_s"] for r in bests],
                       "ratio": b2 / a, "ratio_command": cmd2 / a,
                       "ratio_command_reused": cmd2_reused / a,
                       "billed_vcpu_ms_per_image": vcpu_ms_per_image(
                           bests[-1]["rows"], bests[-1]["images"])}}

    result["other_cuts"] = {}
    for cuts in other_cuts:  # one run each, after the alternating rounds
        run = serveless_run(rec_dir, "bench-cuts", preset=None, cuts=cuts or None)
        other = summarize(run["rows"], "x86_64")
        ms = vcpu_ms_per_image(run["rows"], run["images"])
        print(f"    cuts {cuts or '(none: one stage)'}, records of {args.per_record}: "
              f"{run['images_per_s']:.1f} images/s, billed {ms:.2f} ms/image = "
              f"{ms / (floor + dec):.3f} × (floor + decode), ${other['per_million']:.3f} per 1M "
              "(x86_64)")
        cut_parts = billed_parts(run["rows"], run["images"])
        print_billed_parts(cut_parts)
        result["other_cuts"][cuts] = {"per_million_x86": other["per_million"],
                                      "at_1m": million(run["rows"], 2, floor + dec),
                                      "billed_vcpu_ms_per_image": ms,
                                      "billed_over_floor": ms / (floor + dec),
                                      "billed_parts": cut_parts,
                                      "images_per_s": run["images_per_s"]}

    # A second job of the same model and cuts in the same store: stage models reused.
    last = runs[-1]
    t0 = time.perf_counter()
    prepare_job(last["store"], "again", "alexnet", preset="paper", records=str(rec_dir))
    result["setup_reused_s"] = time.perf_counter() - t0
    print(f"\nsetup of a second job, same model and cuts (stage models reused): "
          f"{result['setup_reused_s']:.1f} s, first job {last['setup_s']:.1f} s")

    if args.formats:
        print(f"\nintermediate formats (2 records, one run each); CPU: {the_cpu}")
        _, small = workload(2 * args.per_record, args.per_record, seed=2)
        fmts = {"float32": TensorFormat(), "float16": TensorFormat("float16"),
                "float32+zstd": TensorFormat(compress=True),
                "float16+zstd": TensorFormat("float16", compress=True)}
        result["formats"] = {}
        for name, fmt in fmts.items():
            run = serveless_run(small, f"fmt-{name.replace('+', '-')}", fmt)
            per_img = run["intermediate_bytes"] / run["images"] / 1024
            print(f"  {name:13s} {per_img:8.1f} KB/image of intermediates   "
                  f"{run['images_per_s']:6.1f} images/s")
            result["formats"][name] = {"kb_per_image": per_img, "images_per_s":
                                       run["images_per_s"]}
    print(f"\nsaved {save('bench_main', result)}")


if __name__ == "__main__":
    main()
