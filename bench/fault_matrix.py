"""The fault matrix (issues 5 and 21): each fault, trials, images, rows lost, rows
duplicated, calls done twice.

    python bench/fault_matrix.py [--trials 3] [--images 200] [--per-record 50] [--only F…]

Every trial runs a whole job with the fault injected and counts prediction rows against
the images packed: a lost row is an image with no row, a duplicate is a second row; from
the log, a call done twice is a (record, stage) with more than one successful call (work
paid for twice: two drivers on one job, or a resume that redid what a killed driver had
done). The S3 faults run against a local moto server (tests/s3server.py).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
import flakyfs  # noqa: E402  (the flaky:// test filesystem)
from common import OUT, machine, save, workload  # noqa: E402

from serveless.backends.local import LocalBackend, instance_processes  # noqa: E402
from serveless.data.predictions import read_predictions  # noqa: E402
from serveless.data.records import Example, read_record, write_record
from serveless.driver.log import load_log  # noqa: E402
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.store import Store  # noqa: E402


def count_rows(store: Store, job: str,
               expected: set[tuple[str, int]]) -> tuple[int, int, int, int]:
    """(rows lost, rows duplicated, error rows, calls done twice): the last from the log,
    a (record, stage) with more than one successful call."""
    rows = read_predictions(store, job)
    counts = Counter((r["record"], r["index"]) for r in rows)
    lost = len(expected - set(counts))
    dup = sum(c - 1 for c in counts.values())
    errors = sum(1 for r in rows if r["error"])
    calls = Counter((r["record"], r["stage"]) for r in load_log(store, job) if not r["error"])
    twice = sum(c - 1 for c in calls.values())
    return lost, dup, errors, twice


def expected_rows(rec_dir: Path) -> set[tuple[str, int]]:
    out = set()
    for p in sorted(rec_dir.glob("*.tfrecord")):
        n = len(read_record(p.read_bytes()))
        out |= {(p.stem, i) for i in range(n)}
    return out


def fresh(name: str) -> Path:
    root = OUT / "faults" / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def kill_instances(rec_dir: Path, trial: int) -> tuple[Store, str, str]:
    store = Store(str(fresh(f"kill-{trial}")))
    spec = prepare_job(store, "j", "alexnet", preset="paper", records=str(rec_dir))
    stop, kills = threading.Event(), []

    def killer() -> None:
        rng = random.Random(trial)
        while not stop.is_set():
            time.sleep(rng.uniform(0.3, 1.0))
            procs = instance_processes()
            if procs:
                try:
                    rng.choice(procs).send_signal(signal.SIGKILL)
                    kills.append(1)
                except psutil.Error:
                    pass

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, retries=8, progress=False)
    stop.set()
    t.join()
    note = f"{len(kills)} instances SIGKILLed"
    if result.failed_records:
        # A call killed on every one of its 9 attempts (the killer strikes every 0.3-1 s, and
        # near a job's end it has one instance to choose): the record failed, loudly, and a
        # user runs the job again. That run, without kills, must finish it.
        with LocalBackend() as backend:
            again = run_job(store, JobSpec.load(store, "j"), backend, concurrency=2,
                            retries=8, progress=False)
        note += (f" (records {', '.join(sorted(result.failed_records))} spent their retries; "
                 f"the job run again: {'done' if again.ok else 'failed again'})")
    return store, "j", note


def kill_driver(rec_dir: Path, trial: int) -> tuple[Store, str, str]:
    root = fresh(f"driver-{trial}")
    args = [sys.executable, "-m", "serveless", "run", "--store", str(root), "--job", "j",
            "--records", str(rec_dir), "--preset", "paper", "--concurrency", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(trial).uniform(4, 12))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return Store(str(root)), "j", "driver SIGKILLed once, then the same command again"


def flaky(rec_dir: Path, trial: int) -> tuple[Store, str, str]:
    flakyfs.register()
    os.environ.update(flakyfs.environment())  # for the local function instances too
    root = fresh(f"flaky-{trial}")
    store = Store(f"flaky://{root}", {"fail_rate": 0.05, "seed": trial})
    spec = prepare_job(store, "j", "alexnet", preset="paper", records=str(rec_dir))
    with LocalBackend() as backend:
        run_job(store, spec, backend, concurrency=2, retries=5, progress=False)
    return Store(str(root)), "j", "5% of store reads and writes fail"


def bad_images(rec_dir: Path, trial: int) -> tuple[Store, str, str]:
    root = fresh(f"bad-{trial}")
    recs = root / "records"
    recs.mkdir()
    rng = random.Random(trial)
    for p in sorted(rec_dir.glob("*.tfrecord")):
        exs = read_record(p.read_bytes())
        for i in rng.sample(range(len(exs)), 3):
            e = exs[i]
            exs[i] = Example(e.encoded[: len(e.encoded) // 4], e.filename, e.label)
        buf = io.BytesIO()
        write_record(buf, exs)
        (recs / p.name).write_bytes(buf.getvalue())
    store = Store(str(root / "store"))
    spec = prepare_job(store, "j", "alexnet", preset="paper", records=str(recs))
    with LocalBackend() as backend:
        run_job(store, spec, backend, concurrency=2, progress=False)
    return store, "j", "3 truncated JPEGs per record (error rows expected)"


def two_drivers(rec_dir: Path, trial: int) -> tuple[Store, str, str]:
    root = fresh(f"two-{trial}")
    args = [sys.executable, "-m", "serveless", "run", "--store", str(root), "--job", "j",
            "--records", str(rec_dir), "--preset", "paper", "--concurrency", "1"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    second = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first.wait()
    refused = second.returncode == 2 and "another driver" in second.stderr
    return Store(str(root)), "j", ("the second driver refused (exit 2)" if refused
                                   else f"second driver exit {second.returncode}")


def kill_driver_s3(rec_dir: Path, trial: int) -> tuple[Store, str, str]:
    global _s3
    if _s3 is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from s3server import start_s3_server

        _s3 = start_s3_server()
    url = _s3.url(f"faults-{trial}-{time.time_ns()}")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": _s3.key, "AWS_SECRET_ACCESS_KEY": _s3.secret}
    args = [sys.executable, "-m", "serveless", "run", "--store", url, "--job", "j",
            "--records", str(rec_dir), "--preset", "paper", "--concurrency", "2",
            "--store-option", f"endpoint_url={_s3.endpoint}"]
    rng = random.Random(100 + trial)
    for _ in range(2):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        time.sleep(rng.uniform(3, 10))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=env)
    return Store(url, _s3.options()), "j", "driver SIGKILLed twice on S3, then resumed"


def input_is_the_job(rec_dir: Path, trial: int) -> tuple[Store, str, str]:
    """The input is the job's own folder: refused, and the user's records survive (they are
    then served by a job elsewhere in the store: a lost record would show as lost rows)."""
    root = fresh(f"input-{trial}")
    shutil.copytree(rec_dir, root / "photos")
    bad = subprocess.run([sys.executable, "-m", "serveless", "run", "--store", str(root),
                          "--job", "photos", "--records", str(root / "photos"), "--cuts",
                          "bogus"], capture_output=True, text=True)
    subprocess.run([sys.executable, "-m", "serveless", "run", "--store", str(root), "--job",
                    "j", "--records", str(root / "photos"), "--preset", "paper"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return Store(str(root)), "j", f"the bad command exited {bad.returncode}"


_s3 = None

FAULTS = {"instance SIGKILL at random": kill_instances, "driver SIGKILL + resume": kill_driver,
          "driver SIGKILL twice on S3 + resume": kill_driver_s3,
          "two drivers on one job": two_drivers, "input is the job's folder": input_is_the_job,
          "store 5% transient errors": flaky, "corrupt images": bad_images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--per-record", type=int, default=50)
    ap.add_argument("--only", nargs="*", metavar="FAULT", help="run only these faults")
    args = ap.parse_args()
    _, rec_dir = workload(args.images, args.per_record, seed=4)
    expected = expected_rows(rec_dir)
    print(f"machine: {machine()}")
    print("| fault | trials | images | rows lost | rows duplicated | error rows | calls done "
          "twice | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    result = {}
    for name, fault in FAULTS.items():
        if args.only and name not in args.only:
            continue
        lost = dup = err = twice = 0
        notes = []
        for trial in range(args.trials):
            store, job, note = fault(rec_dir, trial)
            notes.append(note)
            lo, du, er, tw = count_rows(store, job, expected)
            lost, dup, err, twice = lost + lo, dup + du, err + er, twice + tw
        note = notes[0] if len(set(notes)) == 1 else "; ".join(notes)
        images = len(expected) * args.trials
        print(f"| {name} | {args.trials} | {images} | {lost} | {dup} | {err} | {twice} | "
              f"{note} |", flush=True)
        result[name] = {"trials": args.trials, "images": images, "lost": lost, "dup": dup,
                        "errors": err, "calls_done_twice": twice}
    print(f"saved {save('fault_matrix', result)}")


if __name__ == "__main__":
    main()
