"""Nothing lost: fault injection against the whole job (issue 5).

Each test checks the one invariant that matters: exactly one prediction row per input
image, with errors stated, whatever failed on the way.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from helpers import assert_one_row_per_image, rows_of
from PIL import Image

from serveless.backends.local import LocalBackend, instance_processes
from serveless.data.records import Example, read_record, write_record
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.errors import RecordError
from serveless.model.builtins import build_alexnet
from serveless.model.graph import save_model
from serveless.store import Store


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


def _run_cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serveless.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_driver_sigkilled_then_resumed(tmp_path, records_dir):
    store_dir = tmp_path / "store"
    args = ("run", "--store", str(store_dir), "--job", "resume", "--records", str(records_dir),
            "--preset", "paper", "--concurrency", "1")
    proc = _run_cli(*args)

    def finished() -> set[str]:
        """Records whose last stage (3 of the paper preset) the driver logged as done: what
        resume must not redo. A predictions object can exist a few ms before its row is
        logged; a record killed in that window is rightly redone (judged by the objects,
        this test failed 2 runs in 9 here)."""
        return {r["record"] for r in load_log(Store(str(store_dir)), "resume")
                if r["stage"] == 3 and r.get("error") is None}

    deadline = time.time() + 240
    while time.time() < deadline and not finished():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done_before = finished()
    assert done_before and len(done_before) < 3, "kill the driver mid-job"
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "function instances outlived the killed driver"
    rows_before = len(load_log(Store(str(store_dir)), "resume"))

    again = _run_cli(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    store = Store(str(store_dir))
    assert_one_row_per_image(rows_of(store, "resume"), 60)
    new_rows = load_log(store, "resume")[rows_before:]
    assert new_rows, "the second run did nothing"
    recomputed = {r["record"] for r in new_rows} & done_before
    assert not recomputed, f"records done before the kill were recomputed: {recomputed}"


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


def test_corrupt_record_is_refused_before_anything_runs(tmp_path, records_dir):
    """A flipped bit in the user's file: named (their path, byte offset), nothing invoked."""
    rec_dir = tmp_path / "recs"
    rec_dir.mkdir()
    for p in sorted(records_dir.glob("*.tfrecord")):
        data = bytearray(p.read_bytes())
        if p.stem == "00001":
            data[len(data) // 2] ^= 0x40  # a flipped bit inside some image's bytes
        (rec_dir / p.name).write_bytes(bytes(data))
    with pytest.raises(RecordError, match="CRC"):
        read_record((rec_dir / "00001.tfrecord").read_bytes())
    store_dir = tmp_path / "store"
    proc = _run_cli("run", "--store", str(store_dir), "--job", "crc", "--records",
                    str(rec_dir), "--preset", "paper")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    flat = " ".join(err.split()).replace(" ", "")
    assert f"{rec_dir / '00001.tfrecord'}:byte" in flat and "dataCRCmismatch" in flat
    assert not (store_dir / "crc" / "invocations.jsonl").exists()


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


def test_oom_is_reported_then_retried_with_more_memory(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "oom", "alexnet", preset="paper", records=str(records_dir),
                       memory="1024,1024,1024,256")
    with LocalBackend() as backend:
        t0 = time.perf_counter()
        result = run_job(store, spec, backend, concurrency=2, retries=0, progress=False)
        took = time.perf_counter() - t0
    log = load_log(store, "oom")
    ooms = [r for r in log if r["error"] and r["error"]["type"] == "OutOfMemory"]
    # without retries the records that hit the cap fail; later ones get the raised memory
    assert ooms and {r["record"] for r in ooms} == set(result.failed_records)
    assert all("OutOfMemory" in why for why in result.failed_records.values())
    done = {r["record"] for r in log if r["stage"] == 3 and not r["error"]}
    assert done | set(result.failed_records) == {"00000", "00001", "00002"}
    # 256 fails for sure; the raised 384 is near the classifier's cold peak and may too
    assert {r["memory_mb"] for r in ooms} <= {256, 384}
    msg = min(ooms, key=lambda r: r["started"])["error"]["message"]
    assert "stage 3" in msg and "256 MB" in msg and "record" in msg
    assert took < 120
    # raised once per size, not once per concurrent failure, and kept in job.json; 384 MB
    # suffices unless the cold peak lands right at that cap, then it is raised to 576
    raised_to = JobSpec.load(store, "oom").memory
    assert raised_to[:3] == [1024, 1024, 1024] and raised_to[3] in (384, 576)
    failed_sizes = {r["memory_mb"] for r in ooms}
    assert raised_to[3] == {1: 384, 2: 576}[len(failed_sizes)]
    assert result.raised == {3: raised_to[3]}
    # the other stages finished for every record
    assert {r["record"] for r in log if r["stage"] == 2 and not r["error"]} == {
        "00000", "00001", "00002"}

    resumed = JobSpec.load(store, "oom")  # as `serveless run --job oom` would
    with LocalBackend() as backend:
        result = run_job(store, resumed, backend, concurrency=2, retries=3, progress=False)
    assert result.ok and result.raised in ({}, {3: int(raised_to[3] * 1.5)})
    assert_one_row_per_image(rows_of(store, "oom"), 60)
    last = [r for r in load_log(store, "oom") if r["stage"] == 3 and not r["error"]]
    assert last and all(r["memory_mb"] >= raised_to[3] for r in last)


def test_bad_input_refused_before_any_invocation(tmp_path, records_dir):
    import onnx
    from onnx import TensorProto, helper

    bad_model = tmp_path / "ints.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 10])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 10])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])],
                                                  "g", [x], [y])), bad_model)
    store_dir = tmp_path / "store"
    cases = [
        (["--model", str(bad_model)], "N×3×H×W"),
        (["--model", str(tmp_path / "missing.onnx")], "not found"),
        (["--job", "../escape"], "job name"),
        (["--job", "a/b"], "job name"),
    ]
    for extra, needle in cases:
        args = ["run", "--store", str(store_dir), "--records", str(records_dir), *extra]
        if "--job" not in extra:
            args += ["--job", "ok"]
        proc = _run_cli(*args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and needle in err.replace("\n", ""), (extra, err)
    assert not store_dir.exists() or not any(store_dir.rglob("*")), "something was written"
    proc = _run_cli("run", "--store", "nosuchproto://x", "--records", str(records_dir))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "store" in err


@pytest.fixture(scope="module", autouse=True)
def _no_stray_processes():
    yield
    time.sleep(0.5)
    assert not instance_processes(), "function instances left running"


def test_user_model_file_runs(tmp_path, records_dir):
    """A user .onnx file works where a model is named (here: AlexNet exported to a file)."""
    path = tmp_path / "alex.onnx"
    save_model(build_alexnet(seed=1), path)
    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "user", str(path), cuts="pool2", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    assert result.ok and spec.stages == 2
    assert_one_row_per_image(rows_of(store, "user"), 60)
