"""Images/s of a job whose input is WebDataset shards against the same images as TFRecords.

    python bench/bench_formats_input.py [--images 1000] [--per-record 500] [--rounds 2]
                                        [--model alexnet] [--concurrency 2] [--gzip]

The same photos, in the same order and grouping (one shard per record), are served once
from TFRecords (packed by `pack`) and once from WebDataset shards written by webdataset's
own TarWriter (`pip install webdataset`, in the test extra); `--gzip` gzips the shards.
Each round runs both jobs on the local backend, alternating which goes first, so drift in
the machine's speed hits both alike; only the run is timed (the setup copies the records
either way). Prints images/s of each (median over rounds) and their ratio; the goal is
shards / TFRecords >= 0.95: reading a shard with tarfile must not cost what decoding and
the model cost. On a shared machine jobs vary by more than that from run to run, so it
also times what differs alone: stage 0's reading of every record (count and entries, no
decode), in this process, as ms per image and as a share of the job's time per image.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, save, workload  # noqa: E402

from serveless.backends.local import LocalBackend  # noqa: E402
from serveless.data.records import iter_record  # noqa: E402
from serveless.driver.prepare import prepare_job  # noqa: E402
from serveless.driver.scheduler import run_job  # noqa: E402
from serveless.store import Store  # noqa: E402

GOAL = 0.95


def write_shards(rec_dir: Path, dest: Path, gz: bool) -> int:
    """One shard per TFRecord of `rec_dir`, same images in the same order, by webdataset's
    TarWriter; returns the number of images."""
    import webdataset as wds

    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(rec_dir.glob("*.tfrecord")):
        out = dest / f"{path.stem}.tar"
        with open(path, "rb") as f, wds.TarWriter(str(out)) as sink:
            for ex in iter_record(f, str(path)):  # type: ignore[arg-type]
                key = ex.filename.rsplit(".", 1)[0].replace(".", "_")
                sample = {"__key__": key, "jpg": bytes(ex.encoded)}
                if ex.label >= 0:
                    sample["cls"] = ex.label
                sink.write(sample)
                n += 1
        if gz:
            out.with_suffix(".tar.gz").write_bytes(gzip.compress(out.read_bytes(), 6))
            out.unlink()
    return n


def read_ms_per_image(folder: Path, rounds: int = 3) -> float:
    """Stage 0's reading of every record in `folder` (its format's count and entries, no
    decode), best of `rounds`, in ms per image."""
    from serveless.data.formats import detect

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    best = float("inf")
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        for path in files:
            with open(path, "rb") as f:
                fmt = detect(f.read(4096))
                if fmt is None:
                    continue
                f.seek(0)
                count, examples = fmt.read(f, str(path), {})
                n += sum(1 for _ in examples)
                assert n and count
        best = min(best, (time.perf_counter() - t0) * 1000 / max(n, 1))
    return best


def timed_job(root: Path, job: str, records: Path, model: str, concurrency: int) -> float:
    """Seconds of the job's run (its setup not counted)."""
    store = Store(str(root))
    spec = prepare_job(store, job, model, records=str(records), concurrency=concurrency)
    with LocalBackend() as backend:
        t0 = time.perf_counter()
        result = run_job(store, spec, backend, concurrency=concurrency, progress=False)
        wall = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"job {job} failed: {result.failed_records}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--per-record", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--gzip", action="store_true", help="gzip the shards (.tar.gz)")
    args = ap.parse_args()
    _, rec_dir = workload(args.images, args.per_record)
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-formats-", dir=OUT))
    try:
        shard_dir = work / "shards"
        n = write_shards(rec_dir, shard_dir, args.gzip)
        walls: dict[str, list[float]] = {"tfrecord": [], "webdataset": []}
        sources = {"tfrecord": rec_dir, "webdataset": shard_dir}
        for r in range(args.rounds):
            order = list(sources) if r % 2 == 0 else list(reversed(sources))
            for kind in order:
                wall = timed_job(work / f"{kind}-{r}", "j", sources[kind], args.model,
                                 args.concurrency)
                walls[kind].append(wall)
                print(f"round {r}: {kind:10s} {wall:7.2f} s  {n / wall:7.1f} images/s",
                      flush=True)
        rate = {k: n / statistics.median(v) for k, v in walls.items()}
        ratio = rate["webdataset"] / rate["tfrecord"]
        reading = {k: read_ms_per_image(sources[k]) for k in sources}
        job_ms = 1000 * args.concurrency / rate["tfrecord"]  # one chain's ms per image
        extra = (reading["webdataset"] - reading["tfrecord"]) / job_ms
        print(f"\n{n} images, {args.model}, records of {args.per_record}, C={args.concurrency}"
              f"{', gzipped shards' if args.gzip else ''}")
        print(f"TFRecords:        {rate['tfrecord']:7.1f} images/s")
        print(f"WebDataset shards: {rate['webdataset']:6.1f} images/s")
        print(f"shards / TFRecords: {ratio:.3f}  (goal >= {GOAL}: "
              f"{'met' if ratio >= GOAL else 'NOT met'})")
        print(f"reading alone (count and entries, no decode): TFRecords "
              f"{reading['tfrecord']:.3f} ms/image, shards {reading['webdataset']:.3f}; "
              f"the difference is {100 * extra:+.1f}% of a function's {job_ms:.1f} ms per "
              f"image in the job (ratio it allows: {1 / (1 + extra):.3f})")
        save("formats_input" + ("_gzip" if args.gzip else ""),
             {"machine": machine(), "images": n, "model": args.model,
              "per_record": args.per_record, "concurrency": args.concurrency,
              "gzip": args.gzip, "walls_s": walls, "images_per_s": rate, "ratio": ratio,
              "read_ms_per_image": reading, "read_share_of_job": extra})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
