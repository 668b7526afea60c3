"""Stage 0's preprocessing per image: the old Pillow preprocess() vs the fast path (issue 14).

    python bench/bench_decode.py [--images 500] [--rounds 3]

One thread, the sample photos (about 500×375), alternating old and new block by block (25
images; the order flips every block), so that drift in the machine's speed hits both alike;
the ratio is the median of the blocks' ratios. Prints ms/image of each, in wall time and in
this thread's CPU time (less sensitive to other processes on a shared machine), the ratio
(goal >= 1.7), the worst difference in normalised pixels (goal <= 0.05), and the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu, machine, save, workload  # noqa: E402

from serveless.data.images import preprocess, preprocess_pillow

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def old_preprocess(data: bytes, size: int = 224, resize: int = 256) -> np.ndarray:
    """preprocess() as it was before the fast path (commit 9428bb8), for the comparison:
    the Pillow path, then normalisation in separate float passes."""
    arr = preprocess_pillow(data, size, size, resize).astype(np.float32)
    arr = arr * np.float32(1 / 255)
    arr -= MEAN
    arr /= STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def timed(fn, datas: list[bytes]) -> tuple[float, float]:
    """(wall ms, thread CPU ms) per image over a block of images."""
    w, c = time.perf_counter(), time.thread_time()
    for data in datas:
        fn(data)
    n = len(datas)
    return (time.perf_counter() - w) * 1000 / n, (time.thread_time() - c) * 1000 / n


def one_round(datas: list[bytes], out: np.ndarray, block: int) -> dict[str, list]:
    """Per block of images: ms/image (wall, CPU) of old and new, one right after the other
    (which first flips every block). Blocks, not single images: each path runs in its own
    steady state (caches, allocator), as it would in a function."""
    fns = {"old": old_preprocess, "new": lambda d: preprocess(d, out=out)}
    times: dict[str, list] = {"old": [], "new": []}
    for b, i in enumerate(range(0, len(datas), block)):
        for name in (("old", "new") if b % 2 == 0 else ("new", "old")):
            times[name].append(timed(fns[name], datas[i:i + block]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=25, help="images per timed block")
    args = ap.parse_args()

    print(f"machine: {machine()}")
    image_dir, _ = workload(args.images, args.images)
    datas = [p.read_bytes() for p in sorted(image_dir.rglob("*.jpg"))][: args.images]
    worst = max(float(np.abs(preprocess(d) - old_preprocess(d)).max()) for d in datas)
    out = np.empty((3, 224, 224), np.float32)
    old_w, new_w, old_c, new_c, ratio_w, ratio_c = [], [], [], [], [], []
    for rnd in range(args.rounds):
        t = one_round(datas, out, args.block)
        for (ow, oc), (nw, nc) in zip(t["old"], t["new"], strict=True):
            old_w.append(ow)
            new_w.append(nw)
            old_c.append(oc)
            new_c.append(nc)
            ratio_w.append(ow / nw)
            ratio_c.append(oc / nc)
        print(f"round {rnd + 1}: old {statistics.mean(o for o, _ in t['old']):.3f} ms/image, "
              f"new {statistics.mean(n for n, _ in t['new']):.3f} (wall)", flush=True)
    med = statistics.median
    print(f"\nCPU: {cpu()}   ({args.rounds} rounds of {len(datas)} images, blocks of "
          f"{args.block}; medians over blocks)")
    print("                              wall ms/image   CPU ms/image")
    print(f"old preprocess() (Pillow)     {med(old_w):13.3f}   {med(old_c):12.3f}")
    print(f"new preprocess() (fast path)  {med(new_w):13.3f}   {med(new_c):12.3f}")
    print(f"ratio old/new (per block)     {med(ratio_w):13.2f}   {med(ratio_c):12.2f}   "
          "goal >= 1.7")
    print(f"worst |new - old| pixel       {worst:13.4f}   goal <= 0.05 (normalised units)")
    result = {"machine": machine(), "images": len(datas), "block": args.block,
              "old_ms": old_w, "new_ms": new_w, "old_cpu_ms": old_c, "new_cpu_ms": new_c,
              "ratio_wall": med(ratio_w), "ratio_cpu": med(ratio_c), "worst_abs_diff": worst}
    path = save("bench_decode", result)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
