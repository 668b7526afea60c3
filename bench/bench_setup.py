"""A job's fixed setup (prepare_job) for the built-in AlexNet, by what is already there.

    python bench/bench_setup.py [--cuts none|paper|pool1,...] [--images 16] [--rounds 3]

Each round times, alternating so that drift in the machine's speed hits all alike:
  cold:   a fresh store, an empty machine cache of checked stage sets (partition, check,
          upload: what the first job on this machine pays for a model and cuts);
  cached: a fresh store, the set in the machine cache (uploaded, no partition or check);
  reused: a second job in the same store (the set found there: nothing made or uploaded).
The model file's hash is remembered after the first round (filehash.py), as for any job
after the first. Prints the median seconds of each and their ratios to cold. The records
are tiny: setup does not depend on them but for their upload.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, save, workload  # noqa: E402

from serveless.driver.prepare import prepare_job
from serveless.store import Store  # noqa: E402

CACHE_ENV = "SERVELESS_STAGE_CACHE"  # serveless.model.stagecache.STAGE_CACHE_ENV


def timed_prepare(root: Path, job: str, rec_dir: Path, cuts: str | None,
                  preset: str | None) -> float:
    t0 = time.perf_counter()
    prepare_job(Store(str(root)), job, "alexnet", cuts=cuts, preset=preset,
                records=str(rec_dir))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuts", default="none", help="none (the whole model), paper, or names")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cuts, preset = ({"none": (None, None), "paper": (None, "paper")}.get(args.cuts)
                    or (args.cuts, None))
    _, rec_dir = workload(args.images, args.images)
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-setup-", dir=OUT))
    times: dict[str, list[float]] = {"cold": [], "cached": [], "reused": []}
    try:
        for r in range(args.rounds):
            cache = work / f"cache-{r}"
            os.environ[CACHE_ENV] = str(cache)
            times["cold"].append(timed_prepare(work / f"cold-{r}", "j", rec_dir, cuts, preset))
            times["cached"].append(timed_prepare(work / f"cached-{r}", "j", rec_dir, cuts,
                                                 preset))
            times["reused"].append(timed_prepare(work / f"cached-{r}", "j2", rec_dir, cuts,
                                                 preset))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
            for p in work.iterdir():
                shutil.rmtree(p, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.environ.pop(CACHE_ENV, None)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"setup of AlexNet (cuts {args.cuts}), median of {args.rounds}: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    print(f"ratios to cold: cached {med['cached'] / med['cold']:.2f}, "
          f"reused {med['reused'] / med['cold']:.2f}")
    save("bench_setup", {"machine": machine(), "cuts": args.cuts, "times_s": times,
                         "median_s": med})


if __name__ == "__main__":
    main()
