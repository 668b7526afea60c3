"""Memory cap and CPU share for one function instance, the way Lambda enforces them.

Lambda kills an instance that exceeds its memory size and gives it CPU in proportion to
memory. The local backend reproduces both with a cgroup per instance (v2, or v1 on hybrid
hosts) created as a child of the cgroup this process already sits in, so no system-wide
setup is needed beyond being allowed to write there (root, or a delegated subtree). Where
no cgroup is writable, a `Watchdog` thread samples RSS and SIGKILLs offenders instead;
that catches the same programs, only later and without a CPU quota.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ...cgroups import own_dirs, own_v1_dir, own_v2_dir

MIB = 1024 * 1024
CFS_PERIOD_US = 100_000
_MIN_QUOTA_US = 1_000  # the kernel refuses CFS quotas below 1 ms
PREFIX = "serveless-"
_NAME_RE = re.compile(rf"^{PREFIX}.*-(\d+)-(\d+)$")
_counter = itertools.count()
_live: dict[int, InstanceLimits] = {}  # created here and not yet removed, for atexit
_live_lock = threading.Lock()


# ---------------------------------------------------------------- small file helpers


def _write(path: Path, value: str) -> None:
    # One write() call: cgroup files act on each write, so no buffering across calls.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    """Value of `key` in a flat-keyed cgroup file ("key value" per line)."""
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _procs(d: Path) -> list[int]:
    text = _read(d / "cgroup.procs") or ""
    return [int(x) for x in text.split()]


def _rmdir(d: Path, wait: float, evict: bool) -> bool:
    """Remove cgroup dir `d`; True when it is gone.

    A killed process leaves the cgroup populated until the kernel has reaped it, so
    EBUSY is retried for `wait` seconds. With `evict`, processes still alive then are
    moved to the parent cgroup so that the directory never outlives us.
    """
    deadline = time.monotonic() + wait
    evicted = False
    while True:
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                return False
        if time.monotonic() >= deadline:
            if not evict or evicted:
                return False
            evicted = True
            for pid in _procs(d):
                try:
                    _write(d.parent / "cgroup.procs", str(pid))
                except OSError:
                    pass
            deadline = time.monotonic() + 0.5
        time.sleep(0.01)


# ---------------------------------------------------------------- per-instance limits


class InstanceLimits:
    """Memory cap and CPU share of one function instance."""

    def __init__(self, name: str, memory_mb: int, vcpus: float, mode: str = "watchdog",
                 dirs: list[Path] | None = None, cpu_exact: bool = False, reason: str = ""):
        self.name = name
        self.memory_mb = memory_mb
        self.vcpus = vcpus
        self.mode = mode
        self.cpu_exact = cpu_exact
        self.reason = reason  # why this mode: shown in run summaries
        self._dirs = list(dirs or [])  # v2: [dir]; v1: [memory dir] or [memory dir, cpu dir]
        self._peak_fd: int | None = None  # v2 memory.peak resets are per open file

    # -- construction

    @classmethod
    def create(cls, name: str, memory_mb: int, vcpus: float) -> InstanceLimits:
        """A cgroup capped at `memory_mb` with a `vcpus` CPU quota, else a watchdog-mode object.

        Never raises for lack of cgroups: the caller checks `mode` and, in watchdog mode,
        enforces the cap with a `Watchdog`.
        """
        if memory_mb <= 0 or vcpus <= 0:
            raise ValueError(f"memory_mb and vcpus must be positive, got {memory_mb}, {vcpus}")
        if os.environ.get("SERVELESS_NO_CGROUP", "") not in ("", "0"):
            return cls(name, memory_mb, vcpus, reason="SERVELESS_NO_CGROUP is set")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:64] or "fn"
        leaf = f"{PREFIX}{safe}-{os.getpid()}-{next(_counter)}"
        reasons = []
        for attempt in (cls._try_v2, cls._try_v1):
            inst = cls(name, memory_mb, vcpus)
            try:
                if attempt(inst, leaf):
                    with _live_lock:
                        _live[id(inst)] = inst
                    return inst
            except OSError as e:
                inst._reason_fail(f"{e.strerror or e} ({getattr(e, 'filename', '') or ''})")
            reasons.append(inst.reason)
            inst.remove()
        return cls(name, memory_mb, vcpus, reason="no writable cgroup: " + "; ".join(reasons))

    def _reason_fail(self, why: str) -> None:
        self.reason = f"{self.reason} {why}".strip() if self.reason else why

    def _quota_us(self) -> int:
        return max(_MIN_QUOTA_US, int(round(self.vcpus * CFS_PERIOD_US)))

    def _try_v2(self, leaf: str) -> bool:
        parent = own_v2_dir()
        if parent is None:
            self.reason = "cgroup2: not mounted or our cgroup not visible"
            return False
        available = set((_read(parent / "cgroup.controllers") or "").split())
        if not {"memory", "cpu"} <= available:
            self.reason = f"cgroup2 at {parent}: memory/cpu controllers not available"
            return False
        enabled = set((_read(parent / "cgroup.subtree_control") or "").split())
        if not {"memory", "cpu"} <= enabled:
            try:
                _write(parent / "cgroup.subtree_control", "+memory +cpu")
            except OSError as e:
                # EBUSY: our cgroup holds processes and is not the root (no-internal-process
                # rule); moving ourselves out would be too intrusive for a library.
                self.reason = f"cgroup2 at {parent}: cannot enable memory+cpu ({e.strerror})"
                return False
        d = parent / leaf
        os.mkdir(d)
        self._dirs = [d]
        _write(d / "memory.max", str(self.memory_mb * MIB))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        try:
            _write(d / "memory.oom.group", "1")  # Lambda kills the whole instance
        except OSError:
            pass
        _write(d / "cpu.max", f"{self._quota_us()} {CFS_PERIOD_US}")
        self.mode, self.cpu_exact = "cgroup-v2", True
        self.reason = f"memory and cpu cgroup2 under {parent}"
        return True

    def _try_v1(self, leaf: str) -> bool:
        mparent = own_v1_dir("memory")
        if mparent is None:
            self._reason_fail("cgroup v1: no memory hierarchy with our cgroup")
            return False
        md = mparent / leaf
        os.mkdir(md)
        self._dirs = [md]
        limit = str(self.memory_mb * MIB)
        _write(md / "memory.limit_in_bytes", limit)
        if (md / "memory.memsw.limit_in_bytes").exists():
            try:  # must follow limit_in_bytes (memsw >= limit); absent when swap accounting is off
                _write(md / "memory.memsw.limit_in_bytes", limit)
            except OSError:
                pass
        try:
            _write(md / "memory.swappiness", "0")
        except OSError:
            pass  # refused under some hierarchies; with no swap it does not matter
        where = f"memory cgroup under {mparent}"
        cparent = own_v1_dir("cpu")
        if cparent is not None:
            cd = cparent / leaf
            try:
                os.mkdir(cd)
                self._dirs.append(cd)
                _write(cd / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(cd / "cpu.cfs_quota_us", str(self._quota_us()))
                self.cpu_exact = True
                where = f"memory and cpu cgroups under {mparent} and {cparent}"
            except OSError as e:
                if len(self._dirs) > 1:
                    _rmdir(self._dirs.pop(), 0.0, evict=False)
                where += f" (no cpu quota: {e.strerror})"
        else:
            where += " (no cpu hierarchy: no cpu quota)"
        self.mode = "cgroup-v1"
        self.reason = where
        return True

    # -- use

    def attach(self, pid: int) -> None:
        """Move process `pid` (all its threads, and children it forks later) into the cgroup."""
        for d in self._dirs:
            _write(d / "cgroup.procs", str(pid))

    def peak_mb(self) -> float | None:
        """Highest memory use of the cgroup (since creation or `reset_peak`), in MiB."""
        if self.mode == "watchdog" or not self._dirs:
            return None
        d = self._dirs[0]
        if self.mode == "cgroup-v2":
            if self._peak_fd is not None:
                text = os.pread(self._peak_fd, 64, 0).decode()
            else:
                text = _read(d / "memory.peak") or ""
        else:
            text = _read(d / "memory.max_usage_in_bytes") or ""
        try:
            return int(text.split()[0]) / MIB
        except (IndexError, ValueError):
            return None

    def reset_peak(self) -> None:
        """Start a new peak measurement (per invocation, on a warm instance)."""
        if self.mode == "cgroup-v1" and self._dirs:
            try:
                _write(self._dirs[0] / "memory.max_usage_in_bytes", "0")
            except OSError:
                pass
        elif self.mode == "cgroup-v2" and self._dirs:
            # Since Linux 6.12 a write resets the peak as seen through that open file only,
            # so the file stays open and later reads go through it.
            if self._peak_fd is None:
                try:
                    self._peak_fd = os.open(self._dirs[0] / "memory.peak", os.O_RDWR)
                except OSError:
                    return
            try:
                os.write(self._peak_fd, b"reset\n")
            except OSError:
                os.close(self._peak_fd)
                self._peak_fd = None

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of this cgroup."""
        if self.mode == "watchdog" or not self._dirs:
            return False
        d = self._dirs[0]
        if self.mode == "cgroup-v2":
            return (_keyed(_read(d / "memory.events"), "oom_kill") or 0) > 0
        kills = _keyed(_read(d / "memory.oom_control"), "oom_kill")
        if kills is not None:
            return kills > 0
        # Kernels before 4.13 lack the counter: hitting the limit and being empty is the sign.
        failcnt = int((_read(d / "memory.failcnt") or "0").strip() or 0)
        return failcnt > 0 and not _procs(d)

    def remove(self) -> None:
        """Delete the cgroup directories; safe to call twice, and after the process died."""
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        left = [d for d in self._dirs if not _rmdir(d, 2.0, evict=True)]
        self._dirs = left
        if not left:
            with _live_lock:
                _live.pop(id(self), None)

    def __enter__(self) -> InstanceLimits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"InstanceLimits({self.name!r}, {self.memory_mb} MB, {self.vcpus:g} vCPU, "
                f"{self.mode}, cpu_exact={self.cpu_exact})")


@atexit.register
def _remove_all() -> None:
    """Remove cgroups the caller forgot, so a crash-free exit never leaves any behind."""
    with _live_lock:
        live = list(_live.values())
    for inst in live:
        inst.remove()


def probe_limits() -> tuple[str, str, bool]:
    """(mode `InstanceLimits.create` picks here, why, whether the CPU quota was applied),
    found by creating a probe cgroup."""
    probe = InstanceLimits.create("probe", 128, 1.0)
    try:
        reason = probe.reason
        if probe.mode != "watchdog" and not probe.cpu_exact:
            reason += "; CPU share not enforced"
        return probe.mode, reason, probe.cpu_exact
    finally:
        probe.remove()


def cleanup_stale() -> int:
    """Remove empty serveless-* cgroups under ours whose creating process is gone.

    Only empty directories are removed: a populated one belongs to something still
    running (possibly in another PID namespace), whatever its name says.
    """
    count = 0
    for parent in own_dirs():
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        for d in entries:
            m = _NAME_RE.match(d.name)
            if not m or not d.is_dir():
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or psutil.pid_exists(pid):
                continue
            if _rmdir(d, 0.0, evict=False):
                count += 1
    return count


# ---------------------------------------------------------------- watchdog


@dataclass
class _Watched:
    proc: psutil.Process
    cap_mb: int
    peak_mb: float = 0.0


class Watchdog:
    """Samples the RSS (psutil, including children) of registered processes every `interval` s
    and SIGKILLs one above its cap. Used when cgroups are unavailable, and also as a backstop.
    """

    def __init__(self, interval: float = 0.05, children: bool = True):
        self.interval = interval
        # psutil finds children by scanning every process on the machine (/proc/*/stat):
        # 1-2 ms per watched instance per sample. Where a cgroup already caps the whole
        # process tree, watching the process alone is the backstop, and costs ~20 µs.
        self.children = children
        self._watched: dict[int, _Watched] = {}
        self._killed: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, pid: int, cap_mb: int) -> None:
        """Enforce `cap_mb` on `pid` and its descendants; starts the thread if needed."""
        proc = psutil.Process(pid)
        with self._lock:
            self._watched[pid] = _Watched(proc, cap_mb)
            self._killed.pop(pid, None)
        self.start()

    def unwatch(self, pid: int) -> None:
        """Stop watching `pid`; what `killed` says about it is kept until it is watched again."""
        with self._lock:
            self._watched.pop(pid, None)

    def killed(self, pid: int) -> float | None:
        """RSS in MiB seen when the watchdog killed `pid`, or None if it did not."""
        with self._lock:
            return self._killed.get(pid)

    def peak(self, pid: int) -> float | None:
        with self._lock:
            w = self._watched.get(pid)
            return w.peak_mb if w is not None else self._killed.get(pid)

    def reset_peak(self, pid: int) -> None:
        with self._lock:
            w = self._watched.get(pid)
            if w is not None:
                w.peak_mb = 0.0

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="serveless-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                items = list(self._watched.items())
            for pid, w in items:
                self._check(pid, w)

    def _check(self, pid: int, w: _Watched) -> None:
        try:
            tree = [w.proc, *(w.proc.children(recursive=True) if self.children else [])]
        except psutil.Error:
            return  # exited (or a zombie): nothing left to cap
        rss = 0
        for p in tree:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        mb = rss / MIB
        with self._lock:
            if self._watched.get(pid) is not w:
                return  # unwatched meanwhile
            w.peak_mb = max(w.peak_mb, mb)
            over = mb > w.cap_mb
            if over:
                self._killed[pid] = mb
                del self._watched[pid]
        if over:
            for p in tree:  # the whole instance dies, as on Lambda
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
