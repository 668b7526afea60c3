"""Nothing lost: fault injection against the whole job (issue 5): function instances killed
at random, a store that fails a share of its requests, broken images, a record that rots in
the store.

Each test checks the one invariant that matters: exactly one prediction row per input
image, with errors stated, whatever failed on the way. (A driver killed mid-job:
test_driver_resume.py; a faulty network to S3: test_store_s3_faults.py.)
"""

from __future__ import annotations

import io
import os
import random
import signal
import threading
import time

import psutil
import pytest
from helpers import assert_one_row_per_image, rows_of
from PIL import Image

from serveless.backends.local import LocalBackend, instance_processes
from serveless.data.records import Example, write_record
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.store import Store

pytestmark = pytest.mark.e2e


def test_instances_sigkilled_at_random(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "kill", "alexnet", preset="paper", records=str(records_dir))
    stop = threading.Event()
    kills = []

    def busy_instances() -> list[psutil.Process]:
        """Instances using CPU now: in the middle of an invocation (or of their init)."""
        before = {}
        for p in instance_processes():
            try:
                before[p] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        time.sleep(0.15)
        busy = []
        for p, t in before.items():
            try:
                if sum(p.cpu_times()[:2]) - t > 0.03:
                    busy.append(p)
            except psutil.Error:
                pass
        return busy

    def killer() -> None:
        rng = random.Random(3)
        while not stop.is_set() and len(kills) < 3:
            time.sleep(rng.uniform(0.1, 0.5))  # the job takes a few seconds: look often
            procs = busy_instances()
            if procs:
                victim = rng.choice(procs)
                try:
                    victim.send_signal(signal.SIGKILL)
                    kills.append(victim.pid)
                except psutil.Error:
                    pass

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, retries=6, progress=False)
    stop.set()
    thread.join()
    assert kills, "the test killed nothing"
    assert result.ok, result.failed_records
    assert_one_row_per_image(rows_of(store, "kill"), 60)
    log = load_log(store, "kill")
    died = [r for r in log if r["error"]]
    assert died, "no invocation saw its instance die"
    assert all(r["error"]["type"] == "InstanceDied" for r in died)
    assert result.retried == len(died)


def test_flaky_store(tmp_path, records_dir, flaky_filesystem):
    store = Store(f"flaky://{tmp_path}", {"fail_rate": 0.05, "seed": 11})
    spec = prepare_job(store, "flaky", "alexnet", preset="paper", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, retries=5, progress=False)
    assert result.ok, result.failed_records
    assert_one_row_per_image(rows_of(store, "flaky"), 60)
    assert not list(tmp_path.rglob("*.tmp-*")), "a torn temporary object was left behind"


def _jpeg(seed: int) -> bytes:
    from serveless.data.samples import synthetic_photo

    buf = io.BytesIO()
    synthetic_photo(seed, (320, 240)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (11_000, 10_000)).save(buf, "PNG")  # 110 MP, a few hundred KB
    return buf.getvalue()


def test_bad_images_get_error_rows(tmp_path):
    good = _jpeg(1)
    examples = [Example(_jpeg(i), f"good{i}.jpg", 1) for i in range(6)]
    examples.insert(1, Example(good[: len(good) // 3], "truncated.jpg", 1))
    examples.insert(3, Example(b"this is not an image", "text.jpg", 1))
    examples.insert(5, Example(os.urandom(5000), "noise.png", 1))
    examples.append(Example(_bomb(), "bomb.png", 1))
    rec_dir = tmp_path / "recs"
    rec_dir.mkdir()
    with open(rec_dir / "bad.tfrecord", "wb") as f:
        write_record(f, examples)
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "bad", "alexnet", preset="paper", records=str(rec_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    rows = rows_of(store, "bad")
    assert_one_row_per_image(rows, len(examples))
    errors = {r["filename"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"truncated.jpg", "text.jpg", "noise.png", "bomb.png"}
    assert all(e["type"] and e["message"] for e in errors.values())
    assert "MP" in errors["bomb.png"]["message"]
    served = [r for r in rows if not r["error"]]
    assert len(served) == 6 and all(len(r["top5"]) == 5 for r in served)
    assert not result.ok and result.image_errors == 4


def test_record_corrupted_in_the_store_fails_alone(tmp_path, records_dir):
    """Checked on the way in, a record can still rot in the store: that record fails, the
    others are served."""
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "crc", "alexnet", preset="paper", records=str(records_dir))
    copy = tmp_path / "store" / "crc" / "records" / "00001.tfrecord"
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x40
    copy.write_bytes(bytes(data))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    assert set(result.failed_records) == {"00001"}
    assert "CRC" in result.failed_records["00001"]
    rows = rows_of(store, "crc")
    assert {r["record"] for r in rows} == {"00000", "00002"}
    assert_one_row_per_image(rows, 35)
