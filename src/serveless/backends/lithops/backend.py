"""The Lithops backend: every invocation is one Lithops call, on AWS Lambda or any engine
Lithops supports (Google Cloud, Azure, IBM, Kubernetes, ...) or on this machine.

Each call asks for `runtime_memory` = the stage's memory, so on AWS Lambda every memory
size is its own function, as in the paper. The call runs `serveless.runtime.handler.handle(event)`
and returns only its small metrics dict; tensors go through the store. Lithops' per-call
stats (cold start, execution time, peak memory) fill in the InvocationResult.

Lithops runs in a helper process of ours ("sidecar"), never in the driver, because of what
a user found when trying it (issue 6), each handled here:

- Lithops fixes its folders ($TMPDIR/lithops-$USER, ~/.lithops) when it is imported, and
  creates some right then. The sidecar is started with TMPDIR and HOME inside a private
  temp folder, which close() removes; credentials and config under the real home are
  pointed to explicitly (AWS_SHARED_CREDENTIALS_FILE, ..., PYTHONUSERBASE).
- The localhost backend "version 2" (the default) hung after 11-34 back-to-back maps and
  lost calls: version 1 is used, with `runtime` = sys.executable. Version 1 runs one job
  at a time per executor, so the sidecar keeps one executor per call in flight.
- `data_cleaner` would leave a background cleaner process: it is off; the sidecar deletes
  each call's objects from Lithops' storage itself once the result is read.
- `wait(timeout=...)` is a SIGALRM (main thread only, one per process), and a wait without
  one never returns when a worker dies. The sidecar polls each call against its own
  deadline, and notices a dead localhost runner process, and reports either as an error
  result.
- Every process Lithops starts is a descendant of the sidecar (it is their subreaper);
  close(), or the driver's death, ends them all. Nothing stays behind.

Options (`--backend-option key=value`): `config_file` (a Lithops YAML config), `backend`
(Lithops compute backend; default: the config's, else localhost), `storage`, `runtime`,
`log_level`, `timeout_s` (per call, default 900 as Lambda's maximum), `poll_s`, `grace_s`,
`keep_home` (true: leave HOME alone), and any `section.key` of the Lithops config, e.g.
`aws_lambda.execution_role=arn:...` or `aws_s3.storage_bucket=...`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ...runtime.protocol import LITHOPS_BACKEND_DIED, TIMEOUT, InvocationError
from ..base import FunctionSpec, InvocationResult
from .sidecar import end_processes

if importlib.util.find_spec("lithops") is None:  # make_backend turns this into a hint
    raise ImportError("No module named 'lithops'")

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0  # Lambda's maximum
DEFAULT_GRACE_S = 60.0  # beyond the call's own timeout, before we give up on a call
DEFAULT_FUNCTION = "serveless.runtime.handler:handle"
START_TIMEOUT_S = 120.0
_OWN_OPTIONS = {"config_file", "backend", "storage", "runtime", "log_level", "timeout_s",
                "poll_s", "grace_s", "keep_home", "function"}


def ping(event: dict[str, Any]) -> dict[str, Any]:
    """A call target that does nothing: checks a deployment (runtime, permissions, round
    trip) without a job, e.g. `--backend-option function=serveless.backends.lithops:ping`."""
    return {"pong": True, "pid": os.getpid(), "event": event}


# -- configuration (driver side) ----------------------------------------------------------


def build_config(options: dict[str, Any]) -> dict[str, Any]:
    """The Lithops config: the user's file (or Lithops' usual places), then the options,
    then what this backend needs (localhost version 1, our interpreter, no data cleaner)."""
    opts = dict(options)
    unknown = {k for k in opts if k not in _OWN_OPTIONS and "." not in k}
    if unknown:
        raise ValueError(
            f"unknown lithops backend options {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(_OWN_OPTIONS))} "
            "or a Lithops config key as section.key (e.g. aws_lambda.execution_role=...)")
    config = _load_user_config(opts.get("config_file"))
    lithops_cfg = config.setdefault("lithops", {}) or {}
    config["lithops"] = lithops_cfg
    for key in ("backend", "storage", "log_level"):
        if key in opts:
            lithops_cfg[key] = opts[key]
    for key, value in opts.items():
        if "." in key:
            section, _, name = key.partition(".")
            sub = config.get(section) or {}
            sub[name] = value
            config[section] = sub
    backend = lithops_cfg.get("backend")
    if backend is None and "mode" not in lithops_cfg:
        backend = lithops_cfg["backend"] = "localhost"
    lithops_cfg.setdefault("log_level", "WARNING")
    lithops_cfg["data_cleaner"] = False  # else a cleaner process outlives us
    if backend and "runtime" in opts:
        section = config.get(backend) or {}
        section["runtime"] = opts["runtime"]
        config[backend] = section
    if backend == "localhost":
        lithops_cfg.setdefault("storage", "localhost")
        local = config.get("localhost") or {}
        if local.get("version", 1) != 1:
            log.warning("Lithops localhost version %s is not used: version 2 hangs after "
                        "a few dozen calls; using version 1", local["version"])
        local["version"] = 1
        local.setdefault("runtime", sys.executable)
        local["worker_processes"] = 1  # one call per job
        config["localhost"] = local
    return config


def _load_user_config(config_file: str | None) -> dict[str, Any]:
    """Where Lithops itself would look, in its order; our HOME change must not hide it."""
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ValueError(f"lithops config file {str(path)!r} does not exist")
        return _read_yaml(path)
    if os.environ.get("LITHOPS_CONFIG"):
        return dict(json.loads(os.environ["LITHOPS_CONFIG"]))
    candidates = [os.environ.get("LITHOPS_CONFIG_FILE"), ".lithops_config",
                  str(Path.home() / ".lithops" / "config"), "/etc/lithops/config"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return _read_yaml(Path(candidate))
    return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text())
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"lithops config file {str(path)!r} is not a mapping")
    return dict(data or {})


def _sidecar_env(root: Path, keep_home: bool) -> dict[str, str]:
    """The sidecar's environment: private TMPDIR (and HOME), same interpreter and path."""
    env = dict(os.environ)
    (root / "tmp").mkdir()
    env["TMPDIR"] = str(root / "tmp")
    # Imports in the sidecar and its runners resolve as here, installed or not.
    paths = [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if not keep_home:
        home = Path.home()
        (root / "home").mkdir()
        env["HOME"] = str(root / "home")
        pointers = {
            "AWS_SHARED_CREDENTIALS_FILE": home / ".aws" / "credentials",
            "AWS_CONFIG_FILE": home / ".aws" / "config",
            "KUBECONFIG": home / ".kube" / "config",
            "CLOUDSDK_CONFIG": home / ".config" / "gcloud",
            "AZURE_CONFIG_DIR": home / ".azure",
            "DOCKER_CONFIG": home / ".docker",
        }
        for var, path in pointers.items():
            if var not in env and path.exists():
                env[var] = str(path)
        env.setdefault("PYTHONUSERBASE", site.getuserbase())
    return env


# -- the backend (driver side) -------------------------------------------------------------


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: InvocationResult | None = None


class LithopsBackend:
    """Invocations as Lithops calls, run from a sidecar process; thread-safe `invoke`."""

    name = "lithops"

    def __init__(self, options: dict[str, Any] | None = None):
        opts = dict(options or {})
        self.timeout_s = float(opts.get("timeout_s", DEFAULT_TIMEOUT_S))
        self.grace_s = float(opts.get("grace_s", DEFAULT_GRACE_S))
        self.config = build_config(opts)
        self.compute = self.config["lithops"].get("backend") or self.config["lithops"]["mode"]
        if self.compute != "localhost":
            # The platform kills a call at runtime_timeout (Lithops' default: 180 s) and
            # then no status ever comes: our deadline must follow the same clock.
            section = self.config.setdefault(self.compute, {}) or {}
            self.config[self.compute] = section
            section.setdefault("runtime_timeout", int(self.timeout_s))
            self.timeout_s = min(self.timeout_s, float(section["runtime_timeout"]))
        self.storage = self.config["lithops"].get("storage", "(from config)")
        poll_default = 0.1 if self.compute == "localhost" else 1.0
        start = {
            "config": self.config,
            "function": str(opts.get("function", DEFAULT_FUNCTION)),
            "poll_s": float(opts.get("poll_s", poll_default)),
            "grace_s": self.grace_s,
        }
        self._root = Path(tempfile.mkdtemp(prefix="serveless-lithops-"))
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self._dead = ""
        self._log_path = self._root / "sidecar.log"
        parent_sock, child_sock = socket.socketpair()
        try:
            with open(self._log_path, "wb") as log_file:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "serveless.backends.lithops.sidecar",
                     str(child_sock.fileno())],
                    pass_fds=(child_sock.fileno(),), env=_sidecar_env(self._root,
                                                                      bool(opts.get("keep_home"))),
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    cwd=self._root, start_new_session=True,  # Ctrl-C reaches us, not it
                )
        except BaseException:
            parent_sock.close()
            shutil.rmtree(self._root, ignore_errors=True)
            raise
        finally:
            child_sock.close()
        self._sent_credentials: set[str] = set()
        self._sock = parent_sock  # for shutdown(): closing an fd wakes no recv blocked on it
        self._conn = Connection(os.dup(parent_sock.fileno()))
        # A backend never closed still ends its sidecar, at the latest when Python exits.
        self._finalizer = weakref.finalize(self, _reap, self._proc, self._root, self._sock)
        try:
            self._send({"op": "start", "root": str(self._root), **start})
            if not self._conn.poll(START_TIMEOUT_S):
                raise RuntimeError(f"the Lithops sidecar did not start in {START_TIMEOUT_S:.0f} s")
            reply = json.loads(self._conn.recv_bytes())
            if reply.get("op") != "ready":
                raise ValueError(f"lithops backend: {reply.get('error', reply)}")
            self.info: dict[str, Any] = reply.get("info", {})
        except BaseException as exc:
            tail = self._log_tail()
            self.close()
            if isinstance(exc, EOFError):
                raise RuntimeError(f"the Lithops sidecar died while starting:\n{tail}") from exc
            raise
        self._reader = threading.Thread(target=self._read_replies, daemon=True,
                                        name="serveless-lithops-reader")
        self._reader.start()

    def describe(self) -> dict[str, Any]:
        if self.compute == "aws_lambda":
            share = "exact (AWS Lambda: memory / 1769 MB vCPUs)"
        elif self.compute == "localhost":
            share = ("not enforced (Lithops localhost: every call gets the whole machine; "
                     "memory sizes are ignored)")
        else:
            share = f"as {self.compute} allots it for each memory size"
        out = {"backend": "lithops", "lithops_backend": self.compute, "storage": self.storage,
               "lithops_version": self.info.get("lithops_version"), "cpu_share": share,
               "limits": "lithops", "cores": os.cpu_count()}
        if self.compute == "aws_lambda":  # /tmp above 512 MB is billed per GB-s
            section = self.config.get("aws_lambda") or {}
            out["ephemeral_mb"] = int(section.get("ephemeral_storage") or 512)
        return out

    def function_cores(self) -> int | None:
        """Localhost calls share this machine's cores; a cloud function has the vCPUs of
        its memory size (Lambda: memory / 1769 MB, up to 6), whatever the driver has."""
        return os.cpu_count() if self.compute == "localhost" else None

    def store_problem(self, url: str) -> str | None:
        """Why functions on this engine could not reach the store at url, or None."""
        if self.compute == "localhost":
            return None
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        if scheme in {"file", "local", "memory"}:
            return (f"functions on {self.compute} cannot reach the store {url!r} on this "
                    "machine: use an object store, e.g. --store s3://bucket/prefix")
        return None

    def invoke(self, fn: FunctionSpec, event: dict[str, Any]) -> InvocationResult:
        t0 = time.perf_counter()
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise RuntimeError("backend closed")
            call_id = next(self._ids)
            self._pending[call_id] = pending
        try:
            if self._dead:
                return self._failed(LITHOPS_BACKEND_DIED, self._dead, t0)
            unreachable = self.store_problem(event.get("store", {}).get("url", ""))
            if unreachable:
                return self._failed(ValueError.__name__, unreachable, t0)  # final: no retries
            try:
                self._hand_over_credentials(event)
                self._send({"op": "invoke", "id": call_id, "memory": fn.memory_mb,
                            "event": event, "timeout": self.timeout_s})
            except OSError as exc:
                return self._failed(LITHOPS_BACKEND_DIED, f"cannot reach the sidecar: {exc}",
                                    t0)
            # The sidecar enforces the deadline; this one only guards against a hung sidecar.
            if not pending.done.wait(self.timeout_s + 2 * self.grace_s + START_TIMEOUT_S):
                return self._failed(TIMEOUT, f"no answer from Lithops for stage {fn.stage} "
                                    f"on record {event.get('record')}", t0)
            assert pending.result is not None
            return pending.result
        finally:
            with self._lock:
                self._pending.pop(call_id, None)

    def _hand_over_credentials(self, event: dict[str, Any]) -> None:
        """On localhost, the store's credentials go to the sidecar's environment, which
        Lithops' runner processes inherit: never into the call's payload. Functions on a
        cloud engine take them from their own role or environment (docs/aws-lambda.md)."""
        ref = (event.get("store") or {}).get("credentials")
        if self.compute != "localhost" or not ref or ref in self._sent_credentials:
            return
        from ...store.credentials import credentials_env

        self._send({"op": "env", "env": credentials_env()})
        self._sent_credentials.add(ref)

    def close(self) -> None:
        """Stop every Lithops process and remove every file Lithops wrote; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError, ValueError):
            self._send({"op": "shutdown"})
        self._finalizer.detach()
        _reap(self._proc, self._root, self._sock)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._fail_all("backend closed")

    def __enter__(self) -> LithopsBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode()
        with self._send_lock:
            self._conn.send_bytes(data)

    def _read_replies(self) -> None:
        while True:
            try:
                msg = json.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            if msg.get("op") != "result":
                continue
            with self._lock:
                pending = self._pending.get(msg["id"])
            if pending is not None:
                pending.result = InvocationResult(**msg["result"])
                pending.done.set()
        if not self._closed:
            self._dead = f"the Lithops sidecar exited unexpectedly:\n{self._log_tail()}"
            self._fail_all(self._dead)

    def _fail_all(self, why: str) -> None:
        with self._lock:
            pendings = list(self._pending.values())
        for pending in pendings:
            if not pending.done.is_set():
                pending.result = InvocationResult(
                    None, InvocationError(LITHOPS_BACKEND_DIED, why), False, 0.0, 0.0, None)
                pending.done.set()

    def _failed(self, kind: str, message: str, t0: float) -> InvocationResult:
        return InvocationResult(None, InvocationError(kind, message), False, 0.0,
                                (time.perf_counter() - t0) * 1000, None)

    def _log_tail(self, chars: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no sidecar log)"


def _reap(proc: subprocess.Popen[bytes], root: Path, sock: socket.socket | None = None) -> None:
    """Give the sidecar time to stop its runners; then end whatever is left; remove root."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if sock is not None:  # EOF: the sidecar shuts down even if "shutdown" never arrived
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # its session: itself and what it started
        proc.kill()
        proc.wait(timeout=10)
    end_processes(family)
    shutil.rmtree(root, ignore_errors=True)
