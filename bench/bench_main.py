"""The main benchmark (issues 7, 14): serveless on the local backend vs a plain script, one run.

    python bench/bench_main.py [--images 3000] [--per-record 1000] [--rounds 2]

(a) plain: the script a skilled engineer would write: the JPEGs decoded on a thread pool
    (the same decoder as stage 0, serveless.images.preprocess) overlapped with the whole
    model in one onnxruntime session on all cores, batch 32;
(b) serveless: the paper preset on the local backend, concurrency 2, default memory;
    images/s of the job (run_job), and of the whole command (prepare_job + run_job: model
    load, partition, equivalence check, upload of stages and records), in a fresh store;
(c) the floor: the whole model alone in onnxruntime at 1 thread, batch 32, on random
    inputs (ms/image, priced as if billed at 1 vCPU), and stage 0's decode alone (ms/image,
    1 thread); the modeled cost of (b) is compared with floor + decode.
a, b, c alternate (a, b, c, a, b, c, …) so drift in the machine's speed hits all alike;
ratios are taken within one run. The CPU and its flags are printed with the figures:
onnxruntime's kernels, and so every number here, depend on them. Then the size and
time of each intermediate format, and the setup time of a second job that reuses the
stage models.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, cpu, machine, save, workload  # noqa: E402

from serveless.backends.local import LocalBackend  # noqa: E402
from serveless.cost import LAMBDA_GB_SECOND, MB_PER_VCPU, gb_seconds, vcpus  # noqa: E402
from serveless.images import preprocess  # noqa: E402
from serveless.models import build_alexnet  # noqa: E402
from serveless.pipeline import prepare_job, run_job  # noqa: E402
from serveless.report import summarize  # noqa: E402
from serveless.store import Store  # noqa: E402
from serveless.tensors import TensorFormat  # noqa: E402

BATCH = 32


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spinning threads would take the CPU the decode threads need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def plain(model_bytes: bytes, files: list[Path], batch: int = BATCH) -> float:
    """Images/s of the plain script: decode on a thread pool, overlapped with inference."""
    cores = os.cpu_count() or 1
    sess = session(model_bytes, cores)
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
            (probs,) = sess.run(None, {"input": x})
            np.argsort(-probs, axis=1)[:, :5]
        producer.join()
    return len(files) / (time.perf_counter() - t0)


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
                  preset: str | None = "paper", cuts: str | None = None) -> dict:
    """One job in a fresh store: (setup) prepare_job, then run_job."""
    root = OUT / "stores" / job
    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    t0 = time.perf_counter()
    spec = prepare_job(store, job, "alexnet", cuts=cuts, preset=preset, records=str(rec_dir),
                       fmt=fmt, memory=memory)
    setup = time.perf_counter() - t0
    with LocalBackend() as backend:
        t1 = time.perf_counter()
        result = run_job(store, spec, backend, concurrency=concurrency, progress=False)
        wall = time.perf_counter() - t1
    assert result.ok, result.failed_records
    rows = result.rows
    inter = sum(r["bytes_out"] for r in rows if r["stage"] < spec.stages - 1)
    return {"images_per_s": result.images / wall, "wall_s": wall, "setup_s": setup,
            "command_images_per_s": result.images / (setup + wall), "rows": rows,
            "images": result.images, "intermediate_bytes": inter, "cpu": result.backend,
            "store": store, "spec": spec}


def vcpu_ms_per_image(rows: list[dict], images: int) -> float:
    """Billed time per image in 1-vCPU terms: what the cost is proportional to."""
    return sum(r["billed_ms"] * vcpus(r["memory_mb"]) for r in rows) / images


def per_million_at_1_vcpu(ms: float, arch: str = "x86_64") -> float:
    """$ per 1M images for `ms` of 1-vCPU function time per image (compute only)."""
    return gb_seconds(MB_PER_VCPU, ms) * LAMBDA_GB_SECOND[arch] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--per-record", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--formats", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cuts", action="append", default=[],
                    help="other cuts to price as well, e.g. pool2 or '' (one stage); repeatable")
    args = ap.parse_args()

    the_cpu = cpu()
    print(f"machine: {machine()}")
    image_dir, rec_dir = workload(args.images, args.per_record)
    files = sorted(image_dir.rglob("*.jpg"))
    model_bytes = build_alexnet().SerializeToString()
    base, runs, floors, decodes = [], [], [], []
    for rnd in range(args.rounds):
        base.append(plain(model_bytes, files))
        print(f"round {rnd + 1}: (a) plain {base[-1]:.1f} images/s", flush=True)
        run = serveless_run(rec_dir, f"bench-{rnd}")
        runs.append(run)
        print(f"round {rnd + 1}: (b) serveless {run['images_per_s']:.1f} images/s "
              f"(whole command {run['command_images_per_s']:.1f}, setup {run['setup_s']:.1f} s)",
              flush=True)
        floors.append(floor_ms(model_bytes))
        decodes.append(decode_ms(files))
        print(f"round {rnd + 1}: (c) floor {floors[-1]:.2f} ms/image, stage-0 decode "
              f"{decodes[-1]:.2f} ms/image", flush=True)
    a = statistics.median(base)
    b = statistics.median(r["images_per_s"] for r in runs)
    cmd = statistics.median(r["command_images_per_s"] for r in runs)
    floor, dec = statistics.median(floors), statistics.median(decodes)
    rows, images = runs[-1]["rows"], runs[-1]["images"]
    x86, arm = summarize(rows, "x86_64"), summarize(rows, "arm64")
    billed = vcpu_ms_per_image(rows, images)
    limit = 1.15 * (floor + dec)

    print(f"\nCPU: {the_cpu}   ({args.images} images, records of {args.per_record}, "
          f"medians of {args.rounds} rounds)")
    print(f"(a) plain script           {a:7.1f} images/s")
    print(f"(b) serveless job          {b:7.1f} images/s   ({runs[-1]['cpu']['cpu_share']})")
    print(f"    whole command          {cmd:7.1f} images/s   (setup included: "
          f"{statistics.median(r['setup_s'] for r in runs):.1f} s)")
    print(f"ratio job/plain            {b / a:7.3f}   goal >= 0.95")
    print(f"ratio command/plain        {cmd / a:7.3f}   goal >= 0.85")
    for st in x86["stages"]:
        print(f"stage {st.stage}: peak {st.peak_mb:6.0f} MB   mean {st.mean_duration_ms:8.0f} ms"
              f"   {st.gb_s:8.2f} GB-s")
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
    result = {"machine": machine(), "cpu": the_cpu, "images": args.images,
              "per_record": args.per_record, "plain": base,
              "serveless": [r["images_per_s"] for r in runs],
              "command": [r["command_images_per_s"] for r in runs],
              "setup_s": [r["setup_s"] for r in runs], "ratio": b / a,
              "ratio_command": cmd / a, "floor_ms": floors, "decode_ms": decodes,
              "billed_vcpu_ms_per_image": billed, "billed_over_floor": billed / (floor + dec),
              "peaks": {st.stage: st.peak_mb for st in x86["stages"]}, "gb_s": x86["gb_s"],
              "per_million_x86": x86["per_million"], "per_million_arm": arm["per_million"]}

    result["other_cuts"] = {}
    for cuts in args.cuts:  # one run each, after the alternating rounds
        run = serveless_run(rec_dir, "bench-cuts", preset=None, cuts=cuts or None)
        other = summarize(run["rows"], "x86_64")
        ms = vcpu_ms_per_image(run["rows"], run["images"])
        print(f"    cuts {cuts or '(none: one stage)'}: {run['images_per_s']:.1f} images/s, "
              f"billed {ms:.2f} ms/image = {ms / (floor + dec):.3f} × (floor + decode), "
              f"${other['per_million']:.3f} per 1M (x86_64)")
        result["other_cuts"][cuts] = {"per_million_x86": other["per_million"],
                                      "billed_vcpu_ms_per_image": ms,
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
