"""One driver per job: a lease object in the job's folder says which driver runs it now.

Two drivers on one job did all its work twice, each deleting the other's in-flight
temporary objects and overwriting the other's log. So a driver takes `<job>/lease` before
it writes anything: created atomically (a PUT with If-None-Match: * on S3, a hard link on a
local folder), renewed every RENEW_S seconds by a thread while the driver runs (a
conditional write: If-Match on S3, a locked compare-and-rename on a local folder), and
removed when it stops. A second driver finds the lease fresh and stops with one line naming
its holder (host, pid, since). A driver that was killed stops renewing: once the lease is
TTL_S seconds old (or at once, when its process on this machine is gone), the next driver
takes it over, conditionally again, so two drivers that both find it expired cannot both
win, and says so.

Times are the holders' clocks (seconds since the epoch): the TTL is far above any sane
skew between two machines that run drivers for one store.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..errors import JobError, StoreError
from ..store import JobLayout, Store

TTL_S = 60.0  # a lease not renewed for this long is expired: its driver is gone
RENEW_S = 15.0


def read_lease(store: Store, job: str) -> dict[str, Any] | None:
    """The job's lease as its holder wrote it, or None when no driver holds the job."""
    found = store.read_versioned(JobLayout(job).lease)
    return _parse(found[0]) if found else None


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    """'host H, pid P, since <UTC>, renewed Ns ago' (and 'expired' when it is)."""
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(lease.get("since", 0))))
    age = max(0.0, now - float(lease.get("renewed", 0)))
    state = " (expired: its driver stopped renewing it)" if age > TTL_S else ""
    return (f"host {lease.get('host', '?')}, pid {lease.get('pid', '?')}, since {since}, "
            f"renewed {age:.0f} s ago{state}")


def gone(lease: dict[str, Any]) -> bool:
    """Whether the lease's driver ran on this machine and its process is gone (killed): its
    lease need not be waited out."""
    import psutil

    try:
        pid = int(lease.get("pid", 0))
    except (TypeError, ValueError):
        return False
    return (lease.get("host") == socket.gethostname() and pid > 0 and pid != os.getpid()
            and not psutil.pid_exists(pid))


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        lease = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return lease if isinstance(lease, dict) else None


class JobLease:
    """The lease on one job, held from `acquire` to `release` (or the `with` block)."""

    def __init__(self, store: Store, job: str, say: Callable[[str], None] | None = None):
        self.store = store
        self.layout = JobLayout(job)
        self.say = say or (lambda _m: None)
        self.token = uuid.uuid4().hex
        self.lost = ""  # why the lease was lost while held, "" while it is held
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _content(self, since: float) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                           "renewed": time.time(), "token": self.token,
                           "ttl_s": TTL_S}).encode()

    def acquire(self) -> JobLease:
        """Take the lease, or raise JobError naming the driver that holds it."""
        key = self.layout.lease
        self._since = time.time()
        for _ in range(3):  # a race with another taker costs a retry, not a wrong answer
            if self.store.create(key, self._content(self._since)):
                found = self.store.read_versioned(key)
                if found and (_parse(found[0]) or {}).get("token") == self.token:
                    self._version = found[1]
                    break
                continue
            found = self.store.read_versioned(key)
            if found is None:
                continue  # released between our create and our read: try again
            held = _parse(found[0]) or {}
            if time.time() - float(held.get("renewed", 0)) <= TTL_S and not gone(held):
                raise JobError(f"job {self.layout.job!r} is run by another driver ("
                               f"{describe(held)}); wait for it, or stop it and run again")
            version = self.store.replace(key, self._content(self._since), found[1])
            if version is not None:
                self.say(f"took over job {self.layout.job!r} from a driver that stopped "
                         f"({describe(held)})")
                self._version = version
                break
        else:
            raise JobError(f"could not take job {self.layout.job!r}: other drivers keep "
                           "taking it")
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="serveless-lease")
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            self.renew()

    def renew(self) -> bool:
        """Write the lease again with a fresh time, if it is still ours; False when lost."""
        with self._lock:
            if self._version is None or self.lost:
                return False
            try:
                version = self.store.replace(self.layout.lease, self._content(self._since),
                                             self._version)
            except (OSError, StoreError):
                return True  # a store hiccup: the next renewal tries again, well in time
            if version is None:
                self.lost = (f"job {self.layout.job!r}: another driver took its lease "
                             "(this driver did not renew it in time)")
                return False
            self._version = version
            return True

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._version is None or self.lost:
                return
            found = self.store.read_versioned(self.layout.lease)
            if found and (_parse(found[0]) or {}).get("token") == self.token:
                self.store.delete(self.layout.lease)
            self._version = None

    def __enter__(self) -> JobLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
