"""The main benchmark (issue 7): serveless on the local backend vs a plain script, same run.

    python bench/bench_main.py [--images 10000] [--per-record 1000] [--rounds 2]

(a) baseline: one process decodes the JPEGs with Pillow (the same preprocessing) and runs
    the whole model in one onnxruntime session, batch 32, on all cores;
(b) serveless: the paper preset on the local backend, concurrency 2, default memory.
The two alternate (a, b, a, b, …) so that drift in the machine's speed hits both alike.
Prints images/s of each, the ratio (b)/(a), per-stage peak memory, GB-s and $ per 1M
images (x86_64 and arm64), and then the size and time of each intermediate format.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, save, workload  # noqa: E402

from serveless.backends.local import LocalBackend  # noqa: E402
from serveless.images import preprocess  # noqa: E402
from serveless.models import build_alexnet  # noqa: E402
from serveless.pipeline import prepare_job, run_job  # noqa: E402
from serveless.report import summarize  # noqa: E402
from serveless.store import Store  # noqa: E402
from serveless.tensors import TensorFormat  # noqa: E402


def baseline(image_dir: Path, batch: int = 32) -> float:
    """Images/s of the plain script: decode, preprocess, whole model, batch 32."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(build_alexnet().SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    files = sorted(image_dir.rglob("*.jpg"))
    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        x = np.stack([preprocess(f.read_bytes()) for f in files[i:i + batch]])
        (probs,) = sess.run(None, {"input": x})
        np.argsort(-probs, axis=1)[:, :5]
    return len(files) / (time.perf_counter() - t0)


def serveless_run(rec_dir: Path, job: str, fmt: TensorFormat | None = None,
                  memory: str | None = None, concurrency: int = 2) -> dict:
    root = OUT / "stores" / job
    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    spec = prepare_job(store, job, "alexnet", preset="paper", records=str(rec_dir), fmt=fmt,
                       memory=memory)
    with LocalBackend() as backend:
        t0 = time.perf_counter()
        result = run_job(store, spec, backend, concurrency=concurrency, progress=False)
        wall = time.perf_counter() - t0
    assert result.ok, result.failed_records
    rows = result.rows
    inter = sum(r["bytes_out"] for r in rows if r["stage"] < spec.stages - 1)
    return {"images_per_s": result.images / wall, "wall_s": wall, "rows": rows,
            "images": result.images, "intermediate_bytes": inter, "cpu": result.backend}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--per-record", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--formats", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    print(f"machine: {machine()}")
    image_dir, rec_dir = workload(args.images, args.per_record)
    base, ours, runs = [], [], []
    for rnd in range(args.rounds):
        base.append(baseline(image_dir))
        print(f"round {rnd + 1}: (a) baseline {base[-1]:.1f} images/s", flush=True)
        run = serveless_run(rec_dir, f"bench-{rnd}")
        ours.append(run["images_per_s"])
        runs.append(run)
        print(f"round {rnd + 1}: (b) serveless {ours[-1]:.1f} images/s", flush=True)
    a, b = statistics.median(base), statistics.median(ours)
    rows = runs[-1]["rows"]
    x86, arm = summarize(rows, "x86_64"), summarize(rows, "arm64")
    print(f"\n(a) baseline   {a:7.1f} images/s   (median of {args.rounds})")
    print(f"(b) serveless  {b:7.1f} images/s   ({runs[-1]['cpu']['cpu_share']})")
    print(f"ratio (b)/(a)  {b / a:7.3f}   goal >= 0.9")
    for st in x86["stages"]:
        print(f"stage {st.stage}: peak {st.peak_mb:6.0f} MB   mean {st.mean_duration_ms:8.0f} ms"
              f"   {st.gb_s:8.2f} GB-s   (goal: peak <= 512 MB)")
    print(f"total {x86['gb_s']:.2f} GB-s for {x86['images']} images; $ per 1M images: x86_64 "
          f"{x86['per_million']:.3f}, arm64 {arm['per_million']:.3f}   goal <= 0.40")
    result = {"machine": machine(), "baseline": base, "serveless": ours, "ratio": b / a,
              "peaks": {st.stage: st.peak_mb for st in x86["stages"]}, "gb_s": x86["gb_s"],
              "per_million_x86": x86["per_million"], "per_million_arm": arm["per_million"]}
    if args.formats:
        print("\nintermediate formats (2 records, one run each):")
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
