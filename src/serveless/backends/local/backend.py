"""The embedded default backend: a small function runtime on this machine that behaves like
AWS Lambda.

Each function instance is a worker process serving one stage. It is started on demand
(a cold start: process start, imports and model load, reported as init ms), reused for
later invocations of the same function while warm, and stopped after a keep-alive. Its
memory is capped (a kernel cgroup where we may create one, else an RSS watchdog) and its
CPU share is memory / 1769 vCPUs. Messages between driver and instance are JSON.

Two options make it a platform that is not this machine, to test plans against (issue 22):
`cpu_scale=F` gives every instance F times the CPU quota its memory buys (a slower or
faster CPU per vCPU; still billed on its memory, as Lambda bills memory whatever its
CPU does), and `platform_init_ms=N` adds N ms to every cold start after the instance is
ready (Lambda's own environment setup, which a local process start does not have; billed
as init, as Lambda bills the init phase).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing.connection as mpc
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from ...cost import vcpus
from ...runtime.protocol import (
    BAD_REPLY,
    INSTANCE_DIED,
    MODEL_CACHE_ENV,
    OUT_OF_MEMORY,
    TIMEOUT,
    TOO_MANY_REQUESTS,
    CalibrationAnswer,
    InvocationError,
    Metrics,
)
from ...store.credentials import credentials_env
from ..base import FunctionSpec, InvocationResult
from .isolation import InstanceLimits, Watchdog, cleanup_stale, probe_limits

DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_TIMEOUT_S = 900.0  # Lambda's maximum (AWS: Lambda quotas, read 2026)


WORKER_MODULE = "serveless.backends.local.worker"

OPTIONS = ("throttle_rate", "throttle_seed", "cpu_scale", "platform_init_ms")
"""The `--backend-option` keys the local backend takes."""
MAX_PLATFORM_INIT_MS = 600_000.0  # longer than any init Lambda allows (10 s; 15 min SnapStart)


def _number(name: str, value: Any) -> float:
    """`value` as a finite float, or a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_options(options: dict[str, Any]) -> None:
    """Refuse unknown local backend options by name, before anything starts."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown local backend option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(OPTIONS)}")


def instance_processes(parent: int | None = None) -> list[Any]:
    """The function instances (worker processes) below a driver process, this one by default:
    what to look at, or kill, when checking that a run leaves nothing behind."""
    import psutil

    out = []
    for p in psutil.Process(parent).children(recursive=True):
        try:
            if WORKER_MODULE in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


class _Instance:
    _ids = itertools.count(1)  # next() is atomic under the GIL: concurrent cold starts

    def __init__(self, fn: FunctionSpec, watchdog: Watchdog, model_cache: str, tmp_root: str,
                 spawn: Callable[..., subprocess.Popen[bytes]], cpu_scale: float = 1.0,
                 platform_init_ms: float = 0.0):
        what = f"stage{fn.stage}" if fn.model_key else "calibration"  # no stage: calibrate
        self.id = f"{what}-{fn.memory_mb}mb-{next(_Instance._ids)}"
        # Its own temporary folder (TMPDIR): the records it downloads and anything a killed
        # call leaves go with the instance when it stops, not into the machine's /tmp.
        self.tmp = os.path.join(tmp_root, self.id)
        os.makedirs(self.tmp, exist_ok=True)
        self.fn = fn
        self.watchdog = watchdog
        self.invocations = 0
        self.last_used = time.monotonic()
        self.platform_init_ms = platform_init_ms
        self.limits = InstanceLimits.create(self.id, fn.memory_mb,
                                            vcpus(fn.memory_mb) * cpu_scale)
        ours, theirs = socket.socketpair()
        self.started = time.perf_counter()
        spec = {"store": fn.store, "model_key": fn.model_key, "threads": fn.threads}
        # A fresh interpreter (not fork: onnxruntime's threads; not multiprocessing's spawn:
        # it re-runs the caller's __main__, which fails from stdin or notebooks).
        # Its spec goes over the socket and the store's credentials through the environment:
        # nothing of the store is on its command line, which `ps` shows to every user.
        self.proc = spawn(
            [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
            # Out of the terminal's process group: Ctrl-C reaches the driver alone, which
            # stops its instances; one still importing would print a KeyboardInterrupt.
            start_new_session=True,
            env={**os.environ, **credentials_env(), MODEL_CACHE_ENV: model_cache,
                 "TMPDIR": self.tmp},
        )
        theirs.close()  # the instance holds the only other end: its death reads as EOF
        self.conn = mpc.Connection(ours.detach())
        self.pid = self.proc.pid
        self.limits.attach(self.pid)
        self.watchdog.watch(self.pid, fn.memory_mb)
        self.conn.send_bytes(json.dumps({"go": spec}).encode())  # after it is in its cgroup
        self.init_ms: float | None = None

    def _wait(self, timeout: float) -> bytes | None:
        """The next message, or None if the process died; raises TimeoutError."""
        if not self.conn.poll(timeout):
            raise TimeoutError
        try:
            return self.conn.recv_bytes()
        except (EOFError, OSError):
            return None

    def death(self, record: str) -> InvocationError:
        """Why the process died: OutOfMemory when a cap killed it."""
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        watchdog_peak = self.watchdog.killed(self.pid)
        call = (f"stage {self.fn.stage} on record {record}" if self.fn.model_key
                else "the calibration call")
        if watchdog_peak is not None or self.limits.oom_killed():
            peak = watchdog_peak or self.limits.peak_mb() or self.fn.memory_mb
            return InvocationError(OUT_OF_MEMORY, (
                f"{call} exceeded its memory: cap {self.fn.memory_mb} MB, peak {peak:.0f} MB"))
        code = self.proc.returncode
        return InvocationError(INSTANCE_DIED, f"the instance of {call} died (exit code {code})")

    def start_wait(self, timeout: float, record: str) -> InvocationError | None:
        """Wait for the instance's init; the error if it failed, timed out or died."""
        try:
            msg = self._wait(timeout)
        except TimeoutError:
            msg = json.dumps({"error": InvocationError(
                TIMEOUT, "init ran past the timeout").to_dict()}).encode()
        if self.platform_init_ms:  # the platform's own setup, after ours: waited and billed
            time.sleep(self.platform_init_ms / 1000)
        self.init_ms = (time.perf_counter() - self.started) * 1000
        if msg is None:
            return self.death(record)
        reply = json.loads(msg)
        if reply.get("ready"):
            return None
        self.stop()  # never pooled: a half-started instance would answer with its 'ready'
        err = reply.get("error") or {"type": BAD_REPLY, "message": repr(reply)[:200]}
        return InvocationError(err["type"], f"stage {self.fn.stage} init for record "
                                            f"{record}: {err['message']}")

    def call(self, event: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.invocations:  # a cold invocation's peak includes its init, as on Lambda
            self.limits.reset_peak()
        self.invocations += 1
        self.conn.send_bytes(json.dumps(event).encode())
        try:
            msg = self._wait(timeout)
        except TimeoutError:
            self.stop()
            return {"error": InvocationError(TIMEOUT, (
                f"stage {self.fn.stage} on record {event.get('record')} ran past "
                f"{timeout:.0f} s")).to_dict()}
        self.last_used = time.monotonic()
        if msg is None:
            return {"error": self.death(str(event.get("record"))).to_dict()}
        reply = json.loads(msg)
        if "ok" not in reply and "error" not in reply:
            return {"error": InvocationError(BAD_REPLY, repr(reply)[:200]).to_dict()}
        return reply

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive:
            try:
                self.conn.send_bytes(b"stop")
                self.proc.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.alive:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.watchdog.unwatch(self.pid)
        self.conn.close()
        self.limits.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


STALE_CACHE_S = 3600.0


def remove_stale_caches(root: str | None = None) -> int:
    """Remove the model caches and instance folders (serveless-models-<pid>-<id>,
    serveless-instances-<pid>-<id>) of drivers that are gone and left them more than an hour
    ago: a SIGKILLed driver cannot remove its own. The age keeps a folder whose driver lives
    in another PID namespace (and so looks dead) for the length of any job that still uses
    it; what is removed is only a cache or scratch, made again if needed."""
    root = root or tempfile.gettempdir()
    count = 0
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    for e in entries:
        m = re.fullmatch(r"serveless-(?:models|instances)-(\d+)-[0-9a-f]{8}", e.name)
        if not m or not e.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        try:
            old = time.time() - e.stat(follow_symlinks=False).st_mtime > STALE_CACHE_S
        except OSError:
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid) and old:
            shutil.rmtree(e.path, ignore_errors=True)
            count += 1
    return count


class LocalBackend:
    """Lambda-like runtime on this machine; thread-safe `invoke`."""

    name = "local"

    def __init__(self, max_instances: int | None = None,
                 keep_alive_s: float = DEFAULT_KEEP_ALIVE_S, timeout_s: float = DEFAULT_TIMEOUT_S,
                 throttle_rate: float = 0.0, throttle_seed: int | None = None,
                 cpu_scale: float = 1.0, platform_init_ms: float = 0.0):
        """`throttle_rate`: the share of invocations refused as Lambda refuses them when
        its concurrency is exhausted (429 TooManyRequests), to drill the driver's backoff.
        `cpu_scale` and `platform_init_ms`: a platform slower or faster than this machine
        (see the module's docstring)."""
        throttle_rate = _number("throttle_rate", throttle_rate)
        if not 0.0 <= throttle_rate < 1.0:
            raise ValueError(f"throttle_rate must be in [0, 1), got {throttle_rate}")
        self.cpu_scale = _number("cpu_scale", cpu_scale)
        if self.cpu_scale <= 0:
            raise ValueError(f"cpu_scale must be above 0, got {cpu_scale!r}")
        self.platform_init_ms = _number("platform_init_ms", platform_init_ms)
        if not 0 <= self.platform_init_ms <= MAX_PLATFORM_INIT_MS:
            raise ValueError(f"platform_init_ms must be in [0, {MAX_PLATFORM_INIT_MS:.0f}] ms, "
                             f"got {platform_init_ms!r}")
        self.throttle_rate = throttle_rate
        self._throttle_rng = random.Random(throttle_seed)
        self.max_instances = max_instances
        self.keep_alive_s = keep_alive_s
        self.timeout_s = timeout_s
        self._lock = threading.Condition()
        self._idle: dict[tuple[int, int, str], list[_Instance]] = {}
        self._busy: set[_Instance] = set()
        self._count: dict[tuple[int, int, str], int] = {}
        self._closed = False
        # The instances' disk cache of stage files (a Lambda container's /tmp), shared by
        # the instances of this backend and removed with it.
        # Made by the first instance that caches a stage (S3 stores only), so a run on a
        # local folder leaves no trace even if the driver is killed.
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.model_cache = os.path.join(tempfile.gettempdir(), f"serveless-models-{tag}")
        # Each instance's temporary folder, below one of this backend's, removed with both.
        self.tmp_root = os.path.join(tempfile.gettempdir(), f"serveless-instances-{tag}")
        # Instances are started from one thread that lives as long as the backend: an
        # instance dies with the thread that started it (PR_SET_PDEATHSIG follows the
        # thread, not the process), and the driver's invoking threads end with each job,
        # so a backend used for a second job lost its warm instances.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serveless-spawn")
        cleanup_stale()  # cgroups of a driver that was SIGKILLed
        remove_stale_caches()  # and its instances' model caches and folders
        self.mode, self.mode_reason, self.cpu_exact = probe_limits()
        # Without cgroups the watchdog is the memory cap: every 50 ms, children included.
        # With them the kernel caps each instance's whole tree and the watchdog is only a
        # backstop on the process itself, every 250 ms: scanning for children of 8
        # instances every 50 ms took 14% of a core from the functions (the driver's CPU
        # in a 4-stage C=2 job: 2.3 s in 15.9 s).
        self.watchdog = (Watchdog() if self.mode == "watchdog"
                         else Watchdog(interval=0.25, children=False))
        self.watchdog.start()

    def describe(self) -> dict[str, Any]:
        """'exact' only when every instance's CPU quota was written, else what was applied."""
        if self.cpu_exact:
            share = "exact (cgroup CPU quota)"
        elif self.mode != "watchdog":
            share = (f"approximate (threads only: memory capped by {self.mode}, no CPU quota: "
                     f"{self.mode_reason})")
        else:
            share = "approximate (threads only; no cgroup: " + self.mode_reason + ")"
        out: dict[str, Any] = {"backend": "local", "limits": self.mode, "cpu_share": share,
                               "cores": os.cpu_count()}
        if self.cpu_scale != 1.0:
            out["cpu_share"] += (f"; scaled x{self.cpu_scale:g} (cpu_scale)" if self.cpu_exact
                                 else f"; cpu_scale {self.cpu_scale:g} NOT applied (no quota)")
            out["cpu_scale"] = self.cpu_scale
        if self.platform_init_ms:
            out["platform_init_ms"] = self.platform_init_ms
        return out

    def function_cores(self) -> int | None:
        """Instances run on this machine: threads are capped at its cores."""
        return os.cpu_count()

    def _key(self, fn: FunctionSpec) -> tuple[int, int, str]:
        return (fn.stage, fn.memory_mb, fn.model_key)

    def _acquire(self, fn: FunctionSpec) -> tuple[_Instance, bool]:
        key = self._key(fn)
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("backend closed")
                self._reap_locked()
                idle = self._idle.get(key)
                while idle:
                    inst = idle.pop()
                    if inst.alive:
                        self._busy.add(inst)
                        return inst, False
                    self._forget_locked(inst)
                if self.max_instances is None or self._count.get(key, 0) < self.max_instances:
                    self._count[key] = self._count.get(key, 0) + 1
                    break
                self._lock.wait(timeout=0.5)
        try:
            inst = _Instance(fn, self.watchdog, self.model_cache, self.tmp_root, self._spawn,
                             self.cpu_scale, self.platform_init_ms)
        except BaseException:
            with self._lock:
                self._count[key] -= 1
            raise
        with self._lock:
            self._busy.add(inst)
            if self.cpu_exact and not inst.limits.cpu_exact:  # this one got no quota
                self.cpu_exact = False
                self.mode_reason = inst.limits.reason
        return inst, True

    def _release(self, inst: _Instance) -> None:
        with self._lock:
            self._busy.discard(inst)
            if inst.alive and not self._closed:
                self._idle.setdefault(self._key(inst.fn), []).append(inst)
            else:
                self._forget_locked(inst)  # stops it
            self._lock.notify_all()

    def _forget_locked(self, inst: _Instance) -> None:
        key = self._key(inst.fn)
        self._count[key] = max(0, self._count.get(key, 0) - 1)
        inst.stop()

    def _reap_locked(self) -> None:
        now = time.monotonic()
        for _key, idle in self._idle.items():
            for inst in [i for i in idle if now - i.last_used > self.keep_alive_s]:
                idle.remove(inst)
                self._forget_locked(inst)

    def invoke(self, fn: FunctionSpec, event: dict[str, Any]) -> InvocationResult:
        with self._lock:
            throttled = self.throttle_rate and self._throttle_rng.random() < self.throttle_rate
        if throttled:  # refused before any instance is touched: nothing ran, nothing billed
            return InvocationResult(None, InvocationError(TOO_MANY_REQUESTS, (
                f"Rate exceeded for stage {fn.stage} (injected: throttle_rate "
                f"{self.throttle_rate:g})")), False, 0.0, 0.0, None)
        inst, cold = self._acquire(fn)  # waiting for a free instance is not billed
        record = str(event.get("record"))
        try:
            init_ms = 0.0
            if cold:
                err = inst.start_wait(self.timeout_s, record)
                init_ms = inst.init_ms or 0.0
                if err is not None:  # only the init is billed
                    return InvocationResult(None, err, True, init_ms, 0.0, None, inst.id)
            t0 = time.perf_counter()
            reply = inst.call(event, self.timeout_s)
            elapsed = (time.perf_counter() - t0) * 1000
        finally:
            self._release(inst)
        answer = reply.get("ok")
        if CalibrationAnswer.recognises(answer):  # a calibration call: its figures as they are
            return InvocationResult(answer, None, cold, init_ms, elapsed, answer.get("peak_mb"),
                                    inst.id)
        metrics = Metrics.from_dict(answer) if answer else None
        # peak_mb is the handler's: the unreclaimable charge, sampled (memory.py). The
        # cgroup's raw peak charge is logged beside it, read here, where the cgroup is known.
        if metrics is not None:
            cgroup_peak = inst.limits.peak_mb()
            metrics.peak_cgroup_mb = round(cgroup_peak, 1) if cgroup_peak else None
        return InvocationResult(
            metrics=metrics.to_dict() if metrics is not None else None,
            error=reply.get("error"),
            cold=cold,
            init_ms=init_ms,
            duration_ms=metrics.duration_ms if metrics is not None else elapsed,
            peak_mb=(round(float(metrics.peak_mb), 1)
                     if metrics is not None and metrics.peak_mb is not None else None),
            instance=inst.id,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            instances = [i for idle in self._idle.values() for i in idle] + list(self._busy)
            self._idle.clear()
            self._busy.clear()
        for inst in instances:
            inst.stop()
        self.watchdog.stop()
        self._spawner.shutdown(wait=False)
        shutil.rmtree(self.model_cache, ignore_errors=True)
        shutil.rmtree(self.tmp_root, ignore_errors=True)

    def _spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process started on the backend's own thread (see __init__)."""
        return self._spawner.submit(subprocess.Popen, args, **kwargs).result()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
