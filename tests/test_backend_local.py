"""The local backend behaves like Lambda: warm reuse, keep-alive, caps, errors, Ctrl-C; it
calls its CPU share exact only when a quota was written, and checks its options; it
plays a platform that is not this machine (cpu_scale, platform_init_ms); its worker
serves events over its socket. (What every backend must do, this one included, is
test_backend_contract.py: metrics, cold and warm, errors as data, a whole job, closed.)"""

from __future__ import annotations

import glob
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import run_cli

from serveless.backends import FunctionSpec, make_backend
from serveless.backends.local import LocalBackend, instance_processes
from serveless.backends.local import isolation as L
from serveless.cost import billed_ms
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.model.stagecache import STAGE_CACHE_ENV
from serveless.runtime import cpu
from serveless.store import JobLayout, Store


@pytest.fixture(scope="module")
def job(tmp_path_factory, records_dir):
    store = Store(str(tmp_path_factory.mktemp("store")))
    spec = prepare_job(store, "be", "alexnet", preset="paper", records=str(records_dir))
    return store, spec


def _call(backend, store, spec, stage=0, record="00000", memory=1769, threads=1):
    fn = FunctionSpec(stage=stage, memory_mb=memory, model_key=spec.stage_model_key(stage),
                      store=store.spec(), threads=threads)
    event = {"store": store.spec(), "job": spec.job, "stage": stage, "stages": spec.stages,
             "record": record, "memory_mb": memory, "threads": threads,
             "model": fn.model_key}
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


@pytest.mark.parametrize(("option", "value"), [
    ("cpu_scale", 0), ("cpu_scale", -1), ("cpu_scale", "fast"), ("cpu_scale", True),
    ("cpu_scale", float("nan")), ("platform_init_ms", -5), ("platform_init_ms", "1s"),
    ("platform_init_ms", 1e9), ("throttle_rate", "x")])
def test_platform_options_are_checked(option, value):
    with pytest.raises(ValueError, match=option):
        make_backend("local", {option: value})


def test_unknown_local_options_are_refused_by_name():
    with pytest.raises(ValueError, match="cpu_scal.*known: .*cpu_scale"):
        make_backend("local", {"cpu_scal": 0.5})


@pytest.mark.parametrize("option", ["cpu_scale=0", "cpu_scale=abc", "platform_init_ms=-1",
                                    "cpu_scal=0.5"])
def test_bad_platform_options_are_one_line_before_anything_runs(tmp_path, records_dir, option):
    proc = run_cli("run", "--store", str(tmp_path / "s"), "--job", "j", "--records",
                   str(records_dir), "--preset", "paper", "--backend-option", option)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "error:" in err and option.split("=")[0] in err and "Traceback" not in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.json"))


def _instance_quota_us(pid: int) -> int | None:
    """The CFS quota of the cgroup process `pid` sits in (v2 cpu.max or v1 cfs_quota_us)."""
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            f = f"/sys/fs/cgroup{path}/cpu.max"
        elif "cpu" in controllers.split(","):
            f = f"/sys/fs/cgroup/{controllers}{path}/cpu.cfs_quota_us"
        else:
            continue
        if os.path.exists(f) and "serveless-" in path:
            return int(open(f).read().split()[0])
    return None


@pytest.mark.e2e
def test_cpu_scale_scales_every_instance_quota_and_platform_init_is_waited_and_billed(job):
    """cpu_scale=0.5: the instance's cgroup holds half the quota its memory buys (1769 MB:
    one vCPU, 100 ms per 100 ms period, so 50 ms); platform_init_ms=700 adds ~700 ms to
    the cold start's init and nothing to a warm call."""
    store, spec = job
    quotas, inits = {}, {}
    for scale, extra in ((1.0, 0), (0.5, 700)):
        with LocalBackend(cpu_scale=scale, platform_init_ms=extra) as backend:
            if not backend.cpu_exact:
                pytest.skip(f"no CPU quota here: {backend.mode_reason}")
            cold = _call(backend, store, spec)
            [worker] = instance_processes()
            quotas[scale] = _instance_quota_us(worker.pid)
            warm = _call(backend, store, spec)
            described = backend.describe()
        assert cold.ok and cold.cold and warm.ok and not warm.cold and warm.init_ms == 0
        inits[extra] = cold.init_ms
    assert quotas == {1.0: 100_000, 0.5: 50_000}
    assert described["cpu_scale"] == 0.5 and "x0.5" in described["cpu_share"]
    assert described["platform_init_ms"] == 700
    # the wait is in the init; how much the start itself moves from one cold start to the
    # next (810 ms at scale 1 once, on a loaded machine) is noise around it, so the lower
    # bound is the wait alone (the CLI test's 3 s cannot be reached by a slow start)
    assert inits[700] >= 700 and inits[700] - inits[0] < 700 + max(1500, inits[0]), inits
    assert billed_ms(10.0, inits[700]) >= 10 + 700


@pytest.mark.parametrize(("quota", "asked", "runs"), [
    (None, 2, 2), (None, 1, 1), (0.145, 1, 1), (0.85, 2, 1), (1.0, 2, 1), (1.7, 2, 2),
    (2.55, 2, 2), (2.55, 4, 3)])
def test_a_function_runs_no_more_threads_than_its_quota_rounded_up(monkeypatch, quota, asked,
                                                                    runs):
    monkeypatch.setattr(cpu, "own_quota", lambda: quota)
    assert cpu.usable_threads(asked) == runs


@pytest.mark.e2e
def test_under_cpu_scale_a_3008_mb_instance_runs_one_thread_in_its_085_vcpu(job):
    """3008 MB buys 1.7 vCPUs and the driver asks for 2 threads; under cpu_scale=0.5 its
    quota is 0.85 of a core, where a second thread only spins at the first's barriers
    (runtime/cpu.usable_threads): the call reports 1, unscaled 2; the warm call loads nothing,
    so the instance's init loaded the session the calls use."""
    store, spec = job
    ran = {}
    for scale in (0.5, 1.0):
        with LocalBackend(cpu_scale=scale) as backend:
            if not backend.cpu_exact:
                pytest.skip(f"no CPU quota here: {backend.mode_reason}")
            cold = _call(backend, store, spec, memory=3008, threads=2)
            warm = _call(backend, store, spec, memory=3008, threads=2)
        assert cold.ok and warm.ok and not warm.cold
        assert warm.metrics["model_source"] == "memory"
        assert warm.metrics["handler_init_ms"] == 0
        ran[scale] = (cold.metrics["threads"], warm.metrics["threads"])
    assert ran == {0.5: (1, 1), 1.0: (2, 2)}


@pytest.mark.e2e
def test_a_job_under_cpu_scale_logs_the_platform_init_and_bills_it(tmp_path, records_dir):
    """Through the CLI as a user runs it: every cold row's init_ms holds the platform's
    3 s, and its billed_ms counts it. (Without it these cold inits took 0.6-1.2 s at
    cpu_scale=0.5 here, so 3 s cannot be reached by a slow start alone.)"""
    proc = run_cli("run", "--store", str(tmp_path), "--job", "slow", "--records",
                   str(records_dir), "--cuts", "pool2", "--backend", "local",
                   "--backend-option", "cpu_scale=0.5", "--backend-option",
                   "platform_init_ms=3000")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "x0.5" in out + err
    rows = load_log(Store(str(tmp_path)), "slow")
    cold = [r for r in rows if r["cold"]]
    assert cold and all(r["init_ms"] >= 3000 for r in cold)
    assert all(r["billed_ms"] >= math.ceil(r["duration_ms"]) + 3000 for r in cold)


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
