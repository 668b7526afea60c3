"""The planner's run time at 1 MB memory steps, and the 1M-image Lambda plans it picks.

    python bench/bench_planner.py            # AlexNet fp32 and int8, x86_64 and arm64
    python bench/bench_planner.py --tiny     # fp32 x86_64 only, and 2 synthetic models

Calibrates AlexNet on sample photos (fp32, then int8 stages as `run --quantize int8` makes
them), then plans 1,000,000 images within 600 s on Lambda at 1 MB steps and prints the
search time (goal: under 10 s), the chosen plan with its $ per 1M images, and the paper's
presets memMax (3008 MB everywhere) and memMin (2048/1280/1024/768) simulated at the same
records and concurrency. Then the search time on random 16-block calibrations (the most a
calibration holds, whatever the number of valid cuts) at deadlines 1.01x, 1.5x and 5x the
fastest plan and a budget. Plans and presets are simulated (labelled so); times measured.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save, workload  # noqa: E402

from serveless.model.presets import PAPER_MEM_MAX, PAPER_MEM_MIN, PAPER_PRESET
from serveless.planning.calibrate import calibrate
from serveless.planning.search import search
from serveless.planning.simulate import Target, simulate
from serveless.store import Store  # noqa: E402

IMAGES = 1_000_000
DEADLINE = 600.0


def random_calibration(base: dict, seed: int, blocks: int = 16) -> dict:
    """A made-up model of `blocks` blocks with weights, compute and outputs drawn at random
    (a search-time stress test, not a real model)."""
    rng = np.random.default_rng(seed)
    cal = copy.deepcopy(base)
    cal["blocks"], cal["boundaries"] = [], [f"b{i}" for i in range(blocks - 1)]
    for i in range(blocks):
        w = float(rng.choice([0.1, 1, 5, 50, 300]))
        cal["blocks"].append({
            "index": i, "end": f"b{i}", "ms_per_image_b1": float(rng.uniform(0.1, 10)),
            "ms_per_image": float(rng.uniform(0.05, 6)),
            "speedup_2vcpu": float(rng.uniform(1, 1.9)), "weights_mb": w,
            "act_mb_base": 1.0, "act_mb_per_image": float(rng.uniform(0.01, 2)),
            "bytes_out_per_image": int(rng.choice([260, 4000, 40000, 200000, 800000])),
            "load_ms": w, "model_bytes": int(w * 2**20), "load_peak_mb": w * 1.5})
    cal["model"] = f"random-{seed}"
    return cal


def plan_row(cal: dict, arch: str, precision: str) -> dict:
    tgt = Target.make("lambda")
    t0 = time.perf_counter()
    res = search(cal, IMAGES, tgt, arch, deadline_s=DEADLINE)
    seconds = time.perf_counter() - t0
    b = res.best
    assert b is not None
    base = {"images_per_record": b.per_record, "micro_batch": b.micro_batch,
            "concurrency": b.concurrency, "images": IMAGES, "arch": arch}
    preset = list(PAPER_PRESET["alexnet"])
    sims = {}
    for name, cuts, mem in (("chosen", b.cuts, b.memory),
                            ("memMax", preset, [PAPER_MEM_MAX] * 4),
                            ("memMin", preset, PAPER_MEM_MIN["alexnet"])):
        s = simulate({**base, "cuts": cuts, "memory": mem}, cal, tgt, keep_rows=False)
        sims[name] = {"wall_s": s.wall_s, "per_million": s.cost / IMAGES * 1e6}
    row = {"precision": precision, "arch": arch, "search_s": res.seconds, "all_s": seconds,
           "configs": res.configs, "searched": res.configs_searched, "cuts": b.cuts,
           "memory": b.memory, "per_record": b.per_record, "micro_batch": b.micro_batch,
           "concurrency": b.concurrency, "simulated": sims}
    print(f"{precision} {arch}: searched {res.configs_searched} of {res.configs} "
          f"configurations in {seconds:.2f} s (+{res.front_seconds:.2f} s front); chosen "
          f"cuts {','.join(b.cuts) or 'none'}, {'/'.join(map(str, b.memory))} MB, "
          f"{b.per_record}/record, batch {b.micro_batch}, C={b.concurrency}: simulated "
          f"{sims['chosen']['wall_s']:.0f} s, ${sims['chosen']['per_million']:.3f} per 1M; "
          f"memMax ${sims['memMax']['per_million']:.3f} ({sims['memMax']['wall_s']:.0f} s), "
          f"memMin ${sims['memMin']['per_million']:.3f} ({sims['memMin']['wall_s']:.0f} s)",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="fp32 x86_64 and 2 synthetic models")
    args = ap.parse_args()
    rows, stress = [], []
    with tempfile.TemporaryDirectory(prefix="serveless-bench-plan-") as tmp:
        store = Store(str(Path(tmp) / "store"))
        _, rec = workload(100, 100)
        cals = {"fp32": calibrate("alexnet", store, str(rec))}
        if not args.tiny:
            cals["int8"] = calibrate("alexnet", store, str(rec), quantize="int8")
    for precision, cal in cals.items():
        print(f"calibrated {precision} in {cal['seconds']:.1f} s", flush=True)
        for arch in ("x86_64",) if args.tiny else ("x86_64", "arm64"):
            rows.append(plan_row(cal, arch, precision))
    for seed in range(2 if args.tiny else 6):
        cal = random_calibration(cals["fp32"], seed)
        tgt = Target.make("lambda")
        fastest = search(cal, IMAGES, tgt, deadline_s=1e12, front=False).fastest
        assert fastest is not None
        for what, kw in (("deadline 1.01x", {"deadline_s": fastest.wall_s * 1.01}),
                         ("deadline 1.5x", {"deadline_s": fastest.wall_s * 1.5}),
                         ("deadline 5x", {"deadline_s": fastest.wall_s * 5}),
                         ("budget 0.5x fastest's", {"budget": fastest.cost * 0.5})):
            t0 = time.perf_counter()
            search(cal, IMAGES, tgt, front=False, **kw)
            stress.append({"seed": seed, "request": what, "s": time.perf_counter() - t0})
    worst = max(stress, key=lambda r: r["s"])
    print(f"random 16-block calibrations: {len(stress)} searches, median "
          f"{np.median([r['s'] for r in stress]):.2f} s, worst {worst['s']:.2f} s "
          f"(seed {worst['seed']}, {worst['request']}); goal: under 10 s")
    path = save("bench_planner" + ("_tiny" if args.tiny else ""),
                {"machine": machine(), "rows": rows, "stress": stress})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
