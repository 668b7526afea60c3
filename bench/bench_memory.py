"""Per-stage peak memory and time against images per record (issue 7, second benchmark):
micro-batches streamed through each stage vs the whole record as one batch (the paper).

    python bench/bench_memory.py [--sizes 100,500,1000] [--micro-batch 32]

Every stage runs at 3008 MB (so the CPU share is the same for all), one invocation at a
time; peaks are the instances' peak RSS, cold start included.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, save, workload  # noqa: E402

from serveless.backends.local import LocalBackend  # noqa: E402
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.store import Store  # noqa: E402


def measure(rec_dir: Path, size: int, micro_batch: int) -> dict[int, tuple[float, float]]:
    """{stage: (peak MB, duration s)} for the first record of `size` images."""
    root = OUT / "stores" / f"mem-{size}-{micro_batch}"
    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    first = sorted(rec_dir.glob("*.tfrecord"))[0]
    spec = prepare_job(store, "mem", "alexnet", preset="paper", records=str(first),
                       memory="3008", micro_batch=micro_batch)
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=1, progress=False)
    assert result.ok, result.failed_records
    return {r["stage"]: (r["peak_mb"], r["duration_ms"] / 1000) for r in result.rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,500,1000")
    ap.add_argument("--micro-batch", type=int, default=32)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {machine()}")
    table = {}
    print(f"{'images':>7} {'stage':>5} | {'micro-batch ' + str(args.micro_batch):>24} | "
          f"{'whole record as one batch':>26}")
    print(f"{'':>7} {'':>5} | {'peak MB':>10} {'time s':>12} | {'peak MB':>10} {'time s':>14}")
    for size in sizes:
        _, rec_dir = workload(size, size, seed=1)
        micro = measure(rec_dir, size, args.micro_batch)
        whole = measure(rec_dir, size, size)
        table[size] = {"micro": micro, "whole": whole}
        for k in sorted(micro):
            print(f"{size:>7} {k:>5} | {micro[k][0]:>10.0f} {micro[k][1]:>12.2f} | "
                  f"{whole[k][0]:>10.0f} {whole[k][1]:>14.2f}", flush=True)
    print(f"saved {save('bench_memory', {'machine': machine(), 'table': table})}")


if __name__ == "__main__":
    main()
