"""The local backend behaves like Lambda: warm reuse, keep-alive, caps, errors, Ctrl-C; it
calls its CPU share exact only when a quota was written, and checks its options; its
worker serves events over its socket. (What every backend must do, this one included, is
test_backend_contract.py: metrics, cold and warm, errors as data, a whole job, closed.)"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from serveless.backends import FunctionSpec
from serveless.backends.local import LocalBackend, instance_processes
from serveless.backends.local import isolation as L
from serveless.driver.prepare import prepare_job
from serveless.model.stagecache import STAGE_CACHE_ENV
from serveless.store import JobLayout, Store


@pytest.fixture(scope="module")
def job(tmp_path_factory, records_dir):
    store = Store(str(tmp_path_factory.mktemp("store")))
    spec = prepare_job(store, "be", "alexnet", preset="paper", records=str(records_dir))
    return store, spec


def _call(backend, store, spec, stage=0, record="00000", memory=1769):
    fn = FunctionSpec(stage=stage, memory_mb=memory, model_key=spec.stage_model_key(stage),
                      store=store.spec(), threads=1)
    event = {"store": store.spec(), "job": spec.job, "stage": stage, "stages": spec.stages,
             "record": record, "memory_mb": memory, "threads": 1, "model": fn.model_key}
    return backend.invoke(fn, event)


@pytest.mark.e2e
def test_warm_reuse_and_keep_alive(job):
    store, spec = job
    with LocalBackend(keep_alive_s=1.0) as backend:
        first = _call(backend, store, spec)
        second = _call(backend, store, spec)
        assert first.ok and second.ok
        assert first.cold and first.init_ms > 0
        assert not second.cold and second.init_ms == 0 and second.instance == first.instance
        time.sleep(1.5)  # idle past the keep-alive: the instance is stopped
        third = _call(backend, store, spec)
        assert third.cold and third.instance != first.instance


@pytest.mark.e2e
def test_oom_within_seconds_names_stage_record_cap_and_peak(job):
    store, spec = job
    with LocalBackend() as backend:
        t0 = time.perf_counter()
        res = _call(backend, store, spec, stage=3, record="00001", memory=256)
        took = time.perf_counter() - t0
    assert not res.ok and res.error.type == "OutOfMemory"
    msg = res.error.message
    assert "stage 3" in msg and "256 MB" in msg and "peak" in msg
    assert took < 15


def _our_cgroups() -> list[str]:
    return [p for p in glob.glob("/sys/fs/cgroup/**/serveless-*", recursive=True)
            if f"-{os.getpid()}-" in p]


@pytest.mark.e2e
def test_instances_of_different_stages_have_separate_cgroups_removed_after(job):
    store, spec = job
    backend = LocalBackend()
    if backend.mode == "watchdog":
        backend.close()
        pytest.skip(f"no cgroups here: {backend.mode_reason}")
    try:
        a = _call(backend, store, spec, stage=0, record="00000", memory=1024)
        b = _call(backend, store, spec, stage=0, record="00001", memory=2048)
        assert a.ok and b.ok and a.instance != b.instance
        assert len(_our_cgroups()) >= 2
    finally:
        backend.close()
    assert _our_cgroups() == []


@pytest.mark.e2e
def test_ctrl_c_stops_cleanly(tmp_path, records_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "serveless.cli", "run", "--store", str(tmp_path), "--job", "c",
         "--records", str(records_dir), "--preset", "paper"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    children: list[psutil.Process] = []
    while time.time() < deadline and not children:
        assert proc.poll() is None, proc.communicate()
        children = instance_processes(proc.pid)
        time.sleep(0.1)
    assert children, "no function instance started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "resume" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        "error: interrupted; run the same command again to resume"]
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    leftovers = [p for p in glob.glob("/sys/fs/cgroup/**/serveless-*", recursive=True)
                 if f"-{proc.pid}-" in p]
    assert leftovers == []


@pytest.mark.e2e
def test_ctrl_c_during_setup_leaves_no_job(tmp_path, records_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "serveless.cli", "run", "--store", str(tmp_path), "--job", "c",
         "--records", str(records_dir), "--preset", "paper"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, STAGE_CACHE_ENV: "0"})  # a setup that partitions: long enough
    seen = []
    for line in proc.stderr:  # the setup says what it does: interrupt it there
        seen.append(line)
        if "partitioning" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "error: interrupted before the job started; nothing was kept" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.e2e
def test_init_failures_are_reported_not_raised_and_never_pooled(job):
    store, spec = job
    lay = JobLayout(spec.job)
    with LocalBackend(timeout_s=0.05) as backend:  # no instance can init that fast
        first = _call(backend, store, spec)
        second = _call(backend, store, spec)
    assert first.error.type == "Timeout" and first.cold
    assert second.cold and second.instance != first.instance
    assert first.duration_ms == 0.0 and first.init_ms > 0  # only the init is billed

    missing = FunctionSpec(stage=0, memory_mb=1769, model_key=lay.key("model", "nope.onnx"),
                           store=store.spec(), threads=1)
    with LocalBackend() as backend:
        res = backend.invoke(missing, {"store": store.spec(), "job": spec.job, "stage": 0,
                                       "stages": spec.stages, "record": "00000"})
    assert res.error.type == "StoreError" and "nope.onnx" in res.error.message


def test_model_caches_of_dead_drivers_are_removed(tmp_path):
    """A SIGKILLed driver cannot remove its instances' model cache: the next backend does,
    once its owner is gone and it is over an hour old; a live owner's cache stays."""
    from serveless.backends.local.backend import STALE_CACHE_S, remove_stale_caches

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - STALE_CACHE_S - 60
    made = {}
    for name, pid, mtime in (("dead-old", dead.pid, old), ("dead-new", dead.pid, None),
                             ("alive-old", os.getppid(), old)):
        d = tmp_path / f"serveless-models-{pid}-{abs(hash(name)) % 16**8:08x}"
        (d / "x").mkdir(parents=True)
        (d / "x" / "stage-0.onnx").write_bytes(b"w")
        if mtime is not None:
            os.utime(d, (mtime, mtime))
        made[name] = d
    (tmp_path / "unrelated").mkdir()
    assert remove_stale_caches(str(tmp_path)) == 1
    assert not made["dead-old"].exists()
    assert made["dead-new"].exists() and made["alive-old"].exists()
    assert (tmp_path / "unrelated").exists()


def test_cpu_share_is_exact_only_when_the_quota_was_written(monkeypatch):
    """Memory cgroups work but no CPU quota can be written (no cpu hierarchy or cpu.max):
    the summary must say what was applied, not 'exact'."""
    with LocalBackend() as backend:
        described = backend.describe()
        if backend.mode == "watchdog":
            assert described["cpu_share"].startswith("approximate")
            pytest.skip("no writable cgroup here: the memory-only case cannot be built")
        assert described["cpu_share"].startswith("exact") == backend.cpu_exact
    real_v1 = L.own_v1_dir
    monkeypatch.setattr(L, "own_v2_dir", lambda: None)  # as on a host with only v1 memory
    monkeypatch.setattr(L, "own_v1_dir", lambda c: None if c == "cpu" else real_v1(c))
    with LocalBackend() as backend:
        described = backend.describe()
    if backend.mode == "watchdog":
        pytest.skip("no v1 memory hierarchy here")
    assert backend.mode == "cgroup-v1" and not backend.cpu_exact
    assert described["cpu_share"].startswith("approximate")
    assert "no CPU quota" in described["cpu_share"] and "cgroup-v1" in described["cpu_share"]


def test_throttle_rate_is_checked():
    with pytest.raises(ValueError, match="throttle_rate"):
        LocalBackend(throttle_rate=1.5)


def test_a_worker_serves_events_over_its_socket_until_told_to_stop(
        tmp_path, records_dir, model_file, monkeypatch):
    """worker.main, a function instance's loop, run in this process against a socket: on
    'go' with its spec (never in argv, where other users could read it) it loads its stage
    and says ready, answers each event with the handler's metrics
    or its error as data, and returns on 'stop'; a stage it cannot load is an error sent
    instead of 'ready'."""
    import json
    import multiprocessing.connection as mpc
    import socket
    import threading

    from serveless.backends.local import worker
    from serveless.runtime import loader

    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "w", str(model_file), cuts="r1", records=str(records_dir))
    monkeypatch.setattr(loader, "_SESSIONS", {})  # a cold instance, and none kept after
    parent_death = []
    monkeypatch.setattr(worker, "_die_with_parent", lambda: parent_death.append(True))
    event = {"store": store.spec(), "job": "w", "stage": 0, "stages": spec.stages,
             "record": "00000", "size": spec.input_hw, "model": spec.stage_model_key(0)}

    def serve(model_key: str, messages: list[bytes]) -> list[dict]:
        """Run the worker here; a thread plays the driver, sending each message in turn
        and reading a reply after each but 'stop'."""
        ours, theirs = socket.socketpair()
        driver = mpc.Connection(ours.detach())
        replies: list[dict] = []

        def talk() -> None:
            go = json.dumps({"go": {"store": store.spec(), "model_key": model_key,
                                    "threads": 1}}).encode()
            for msg in [go, *messages]:
                driver.send_bytes(msg)
                if msg == b"stop" or not driver.poll(60):
                    return
                replies.append(json.loads(driver.recv_bytes()))
                if "error" in replies[-1] and msg == go:
                    return

        thread = threading.Thread(target=talk, daemon=True)
        thread.start()
        sigint = signal.getsignal(signal.SIGINT)
        try:
            worker.main(theirs.detach())
        finally:
            signal.signal(signal.SIGINT, sigint)  # main ignores Ctrl-C: give it back
            thread.join(60)
            driver.close()
        assert not thread.is_alive(), "the worker stopped answering"
        return replies

    ready, served, failed = serve(spec.stage_model_key(0), [
        json.dumps(event).encode(), json.dumps({**event, "record": "no-such"}).encode(),
        b"stop"])
    assert ready == {"ready": True} and parent_death == [True]
    metrics = served["ok"]
    assert metrics["record"] == "00000" and metrics["images"] == 25 and metrics["stage"] == 0
    assert store.exists(metrics["output"]["key"])
    assert failed["error"]["type"] == "StoreError" and "no-such" in failed["error"]["message"]
    (refused,) = serve(JobLayout("w").key("model", "nope.onnx"), [])
    assert refused["error"]["type"] == "StoreError" and "nope.onnx" in refused["error"]["message"]
