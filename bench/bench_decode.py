"""Stage 0's preprocessing per image: the old Pillow preprocess() vs the fast path (issue 14).

    python bench/bench_decode.py [--images 500] [--rounds 3]

One thread, the sample photos (about 500×375), alternating old and new image by image (the
order flips every image), so that drift in the machine's speed hits both alike. Prints
ms/image of each, in wall time and in this thread's CPU time (less sensitive to other
processes on a shared machine), the ratio (goal >= 1.7), the worst difference in
normalised pixels (goal <= 0.05), and the CPU.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu, machine, save, workload  # noqa: E402

from serveless.images import _center_crop, _resize_shorter, _to_rgb, preprocess  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def old_preprocess(data: bytes, size: int = 224, resize: int = 256) -> np.ndarray:
    """preprocess() as it was before the fast path (commit 9428bb8), for the comparison."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if img.format == "JPEG":
            scale = resize / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))))
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img = _resize_shorter(img, resize)
        img = _center_crop(img, size, size)
        arr = np.asarray(img, dtype=np.float32)
    arr = arr * np.float32(1 / 255)
    arr -= MEAN
    arr /= STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def timed(fn, data: bytes) -> tuple[float, float]:
    """(wall ms, thread CPU ms) of one call."""
    w, c = time.perf_counter(), time.thread_time()
    fn(data)
    return (time.perf_counter() - w) * 1000, (time.thread_time() - c) * 1000


def one_round(datas: list[bytes], out: np.ndarray) -> dict[str, tuple[float, float]]:
    """ms/image (wall, CPU) of old and new, alternating image by image."""
    fns = {"old": old_preprocess, "new": lambda d: preprocess(d, out=out)}
    sums = {name: [0.0, 0.0] for name in fns}
    for i, data in enumerate(datas):
        for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
            wall, cpu_ms = timed(fns[name], data)
            sums[name][0] += wall
            sums[name][1] += cpu_ms
    return {name: (w / len(datas), c / len(datas)) for name, (w, c) in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    print(f"machine: {machine()}")
    image_dir, _ = workload(args.images, args.images)
    datas = [p.read_bytes() for p in sorted(image_dir.rglob("*.jpg"))][: args.images]
    worst = max(float(np.abs(preprocess(d) - old_preprocess(d)).max()) for d in datas)
    out = np.empty((3, 224, 224), np.float32)
    rounds = []
    for rnd in range(args.rounds):
        r = one_round(datas, out)
        rounds.append(r)
        print(f"round {rnd + 1}: old {r['old'][0]:.3f} ms/image (CPU {r['old'][1]:.3f}), "
              f"new {r['new'][0]:.3f} (CPU {r['new'][1]:.3f}), ratio "
              f"{r['old'][0] / r['new'][0]:.2f} (CPU {r['old'][1] / r['new'][1]:.2f})",
              flush=True)

    def med(name: str, clock: int) -> float:
        return statistics.median(r[name][clock] for r in rounds)

    print(f"\nCPU: {cpu()}   (medians of {args.rounds} rounds of {len(datas)} images)")
    print("                              wall ms/image   CPU ms/image")
    print(f"old preprocess() (Pillow)     {med('old', 0):13.3f}   {med('old', 1):12.3f}")
    print(f"new preprocess() (fast path)  {med('new', 0):13.3f}   {med('new', 1):12.3f}")
    print(f"ratio old/new                 {med('old', 0) / med('new', 0):13.2f}   "
          f"{med('old', 1) / med('new', 1):12.2f}   goal >= 1.7")
    print(f"worst |new - old| pixel       {worst:13.4f}   goal <= 0.05 (normalised units)")
    result = {"machine": machine(), "images": len(datas), "rounds": rounds, "worst_abs_diff": worst,
              "ratio_wall": med("old", 0) / med("new", 0),
              "ratio_cpu": med("old", 1) / med("new", 1)}
    path = save("bench_decode", result)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
