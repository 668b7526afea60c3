"""The Lithops sidecar: the helper process that runs Lithops for the driver.

`python -m serveless.backends.lithops.sidecar FD`. The driver (backend.py) talks to it over
a socket: `start` (the config), `invoke` (one call: its memory, the event, a deadline),
`env` (the store's credentials, for localhost runners only) and `shutdown`. One thread per
call submits it, polls it against its own deadline, notices a localhost runner that died,
and answers a result: the handler's metrics and Lithops' own call stats, or an error of the
protocol's kinds. Why Lithops runs here and not in the driver, and everything it leaves
behind that this process cleans up, is told in backend.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ...runtime.protocol import (
    DETERMINISTIC,
    INSTANCE_DIED,
    LITHOPS_ERROR,
    TIMEOUT,
    TOO_MANY_REQUESTS,
    InvocationError,
    error_of,
)

_DEATH_GRACE_S = 3.0  # a localhost runner gone this long without a status: the call died
_PR_SET_CHILD_SUBREAPER = 36


def end_processes(procs: list[Any]) -> None:
    """Terminate, then kill, a list of psutil processes; reap those that are ours."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=3)


class _Executor:
    """One Lithops FunctionExecutor; `busy` calls in flight; its lock serialises its API."""

    def __init__(self, fexec: Any):
        self.fexec = fexec
        self.lock = threading.Lock()
        self.busy = 0


class _Engine:
    """Submits calls, polls them against a deadline, and turns each into a result dict."""

    def __init__(self, start: dict[str, Any], send: Any):
        import lithops

        self.lithops = lithops
        self.config = start["config"]
        self.poll_s = float(start["poll_s"])
        self.grace_s = float(start["grace_s"])
        module, _, attr = start["function"].partition(":")
        self.function = getattr(importlib.import_module(module), attr)
        self.send = send
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._executors: list[_Executor] = []
        first = self._new_executor()  # a bad config fails here, before any invocation
        self.localhost = first.fexec.mode == "localhost"
        self._executors.append(first)

    def _new_executor(self) -> _Executor:
        """One at a time: a localhost executor stages Lithops' runner script under a name
        made of the process id only, so two created at once in one process collide."""
        with self._create_lock:
            return _Executor(self.lithops.FunctionExecutor(config=self.config))

    def _acquire(self) -> _Executor:
        """Localhost v1 runs one job at a time per executor: one executor per call then.
        Cloud backends invoke asynchronously: one executor serves every call."""
        with self._lock:
            for ex in self._executors:
                if ex.busy == 0 or not self.localhost:
                    ex.busy += 1
                    return ex
        ex = self._new_executor()
        with self._lock:
            ex.busy += 1
            self._executors.append(ex)
        return ex

    def _release(self, ex: _Executor) -> None:
        with self._lock:
            ex.busy -= 1

    def run(self, req: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            result = self._call(req, t0)
        except Exception as exc:  # noqa: BLE001 - any failure is this call's error
            result = _result(None, InvocationError(
                LITHOPS_ERROR, f"{type(exc).__name__}: {exc}").to_dict(), t0)
        result["extra"]["lithops"]["runtime_memory"] = int(req["memory"])  # what was asked
        self.send({"op": "result", "id": req["id"], "result": result})

    def _call(self, req: dict[str, Any], t0: float) -> dict[str, Any]:
        from lithops.wait import ALWAYS

        timeout = float(req["timeout"])
        ex = self._acquire()
        try:
            with ex.lock:
                fut = ex.fexec.call_async(self.function, {"event": req["event"]},
                                          runtime_memory=int(req["memory"]),
                                          timeout=max(1, int(timeout)))
            deadline = time.monotonic() + timeout + self.grace_s
            died_at: float | None = None
            while True:
                with ex.lock:
                    ex.fexec.wait([fut], return_when=ALWAYS, download_results=True,
                                  throw_except=False, show_progressbar=False)
                    if not fut.done and not ex.fexec.job_monitor.is_alive():
                        ex.fexec.job_monitor.start(fs=[fut])
                if fut.done:
                    return self._finished(ex, fut, t0)
                now = time.monotonic()
                code = self._runner_exit_code(ex, fut)
                if code is not None:
                    died_at = died_at or now
                    if now - died_at > _DEATH_GRACE_S:
                        self._stop_job(ex, fut)
                        return _result(None, InvocationError(INSTANCE_DIED, (
                            f"the Lithops runner of {fut.job_key} exited with code {code} "
                            "before reporting a result")).to_dict(), t0)
                if now > deadline:
                    self._stop_job(ex, fut)
                    return _result(None, InvocationError(TIMEOUT, (
                        f"no result from Lithops call {fut.job_key} within {timeout:.0f} s "
                        f"+ {self.grace_s:.0f} s")).to_dict(), t0)
                time.sleep(self.poll_s)
        finally:
            self._release(ex)

    def _finished(self, ex: _Executor, fut: Any, t0: float) -> dict[str, Any]:
        stats = dict(getattr(fut, "stats", {}) or {})
        if fut.error:
            exc_info = getattr(fut, "_exception", None)
            exc = exc_info[1] if exc_info else None
            error = _error_of(exc)
            result = _result(None, error, t0, stats)
        else:
            metrics = fut.result(throw_except=False)
            if not isinstance(metrics, dict):
                result = _result(None, InvocationError(LITHOPS_ERROR, (
                    f"the function returned {type(metrics).__name__}, not its metrics")).to_dict(),
                    t0)
            else:
                result = _result(metrics, None, t0, stats)
        result["instance"] = f"lithops:{fut.executor_id}/{fut.job_id}/{fut.activation_id}"
        self._forget(ex, fut)
        return result

    def _runner_exit_code(self, ex: _Executor, fut: Any) -> int | None:
        """Exit code of the localhost process running this call, once it has exited."""
        if not self.localhost:
            return None
        env = getattr(ex.fexec.compute_handler, "env", None)
        proc = getattr(env, "jobs", {}).get(fut.job_key) if env is not None else None
        return proc.poll() if proc is not None else None

    def _stop_job(self, ex: _Executor, fut: Any) -> None:
        with ex.lock, contextlib.suppress(Exception):
            ex.fexec.compute_handler.clear([fut.job_key], exception=TimeoutError())
        self._forget(ex, fut)

    @staticmethod
    def _forget(ex: _Executor, fut: Any) -> None:
        """Delete the call's objects from Lithops' storage (what data_cleaner would do)."""
        from lithops.constants import JOBS_PREFIX

        with contextlib.suppress(Exception):
            internal = ex.fexec.internal_storage
            keys = internal.storage.list_keys(internal.bucket, f"{JOBS_PREFIX}/{fut.job_key}/")
            if keys:
                internal.storage.delete_objects(internal.bucket, keys)

    def close(self) -> None:
        from lithops.constants import JOBS_PREFIX

        for ex in self._executors:
            with contextlib.suppress(Exception):
                internal = ex.fexec.internal_storage
                keys = internal.storage.list_keys(
                    internal.bucket, f"{JOBS_PREFIX}/{ex.fexec.executor_id}/")
                if keys:
                    internal.storage.delete_objects(internal.bucket, keys)
            with contextlib.suppress(Exception):
                ex.fexec.__exit__(None, None, None)  # stops monitors, invokers, local jobs


def _error_of(exc: BaseException | None) -> dict[str, Any]:
    """The error type the driver understands (its retry and OOM rules look at it)."""
    if exc is None:
        return InvocationError(LITHOPS_ERROR, "the call failed without an exception").to_dict()
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or type(exc).__name__ in DETERMINISTIC:
        return error_of(exc).to_dict()
    if TOO_MANY_REQUESTS in name or TOO_MANY_REQUESTS in text or "Rate exceeded" in text:
        name = TOO_MANY_REQUESTS  # Lambda's 429: the driver backs off, no retry is spent
    elif isinstance(exc, TimeoutError) and "maximum time" in text:
        name = TIMEOUT
    elif "exited with code" in text or "exited before" in text:
        name = INSTANCE_DIED
    return InvocationError(name, text).to_dict()


def _result(metrics: dict[str, Any] | None, error: dict[str, Any] | None, t0: float,
            stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """InvocationResult's fields from the handler's metrics and Lithops' call stats.

    duration: what the platform bills, the Lithops worker's whole execution (fetching the
    call, the handler, writing its status) less the handler's model load (init).
    peak: the larger of the handler's own peak and the Lithops worker process's.
    """
    stats = stats or {}
    m = metrics or {}
    init_ms = float(m.get("handler_init_ms") or 0.0)
    exec_ms = float(stats.get("worker_exec_time") or 0.0) * 1000
    handler_ms = float(m.get("duration_ms") or 0.0)
    elapsed = (time.perf_counter() - t0) * 1000
    duration = max(handler_ms, exec_ms - init_ms) if (handler_ms or exec_ms) else elapsed
    peaks = [float(m["peak_mb"])] if m.get("peak_mb") else []
    if stats.get("worker_peak_memory_end"):
        peaks.append(float(stats["worker_peak_memory_end"]) / 2**20)
    cold = stats.get("worker_cold_start")
    keep = ("worker_cold_start", "worker_exec_time", "worker_func_exec_time",
            "worker_peak_memory_start", "worker_peak_memory_end", "host_submit_tstamp",
            "worker_start_tstamp", "worker_end_tstamp", "func_result_size")
    return {
        "metrics": metrics,
        "error": error,
        "cold": bool(cold) if cold is not None else bool(m.get("cold")),
        "init_ms": init_ms,
        "duration_ms": duration,
        "peak_mb": round(max(peaks), 1) if peaks else None,
        "instance": "",
        "extra": {"lithops": {k: stats[k] for k in keep if k in stats}},
    }


def _set_subreaper() -> None:
    """Orphans of our runners become our children, so shutdown can find and reap them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _sidecar(fd: int) -> None:
    """The sidecar's main loop: one thread per call; EOF (the driver died) ends it all."""
    import psutil

    conn = Connection(fd)
    send_lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        data = json.dumps(msg, default=str).encode()
        with send_lock, contextlib.suppress(OSError):
            conn.send_bytes(data)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_subreaper()
    engine: _Engine | None = None
    orphaned = False
    start: dict[str, Any] = {}
    try:
        start = json.loads(conn.recv_bytes())
        logging.basicConfig(level=start["config"]["lithops"].get("log_level", "WARNING"))
        try:
            engine = _Engine(start, send)
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            send({"op": "error", "error": f"{type(exc).__name__}: {exc}"})
            return
        import lithops

        send({"op": "ready", "info": {"lithops_version": lithops.__version__,
                                      "mode": engine.config["lithops"].get("mode")}})
        while True:
            try:
                req = json.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the driver is gone: nobody else will clean up
                orphaned = True
                return
            if req.get("op") == "shutdown":
                return
            if req.get("op") == "env":  # before the calls that need it: same connection
                os.environ.update(req["env"])
                continue
            if req.get("op") == "invoke":
                threading.Thread(target=engine.run, args=(req,), daemon=True,
                                 name=f"call-{req['id']}").start()
    finally:
        if engine is not None:
            engine.close()
        end_processes(psutil.Process().children(recursive=True))
        with contextlib.suppress(OSError):
            conn.close()
        root = start.get("root", "")
        if orphaned and Path(root).name.startswith("serveless-lithops-"):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    _sidecar(int(sys.argv[1]))
    os._exit(0)  # do not wait for call threads blocked in Lithops
