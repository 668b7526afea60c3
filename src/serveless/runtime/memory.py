"""A function's memory use, counted the way the memory cap that kills it counts.

Three figures per invocation:
- `peak_rss_mb`: the process's RSS high-water mark (VmHWM). Exact for the process's own
  pages, blind to what it is charged for outside them: files in tmpfs (/dev/shm, /tmp on
  some hosts), pipe and socket buffers, kernel objects.
- `peak_cgroup_mb`: the cgroup's own peak charge (v2 memory.peak, v1 max_usage_in_bytes).
  It also counts the page cache of every file the call read or wrote (the record, the
  intermediates), which the kernel reclaims before it kills: stage 0 of AlexNet at records
  of 1,000 is charged 550 MB and yet runs under a 256 MB cap.
- `peak_mb`, on which memory advice and OOM margins rest: the peak of the charge less its
  reclaimable file cache (memory.stat's active_file + inactive_file; tmpfs pages are not
  among them, they sit on the anon lists), i.e. the charge the kernel cannot give back,
  sampled every 20 ms (SERVELESS_MEMORY_SAMPLE_MS; 0 turns it off; longer in proportion
  under a CPU quota below a core, runtime/cpu.per_quota) while the function runs, and
  never below the RSS peak. Without a cgroup of its own (Lithops' localhost engine, a
  shared container) it is the RSS peak. At 4 ms the sampling made AlexNet's
  stages about 5% slower; at 20 ms no difference showed (A/B, 2 rounds each).
"""

from __future__ import annotations

import functools
import os
import resource
import threading
from pathlib import Path

from ..cgroups import own_v1_dir, own_v2_dir
from .cpu import per_quota

SAMPLE_ENV = "SERVELESS_MEMORY_SAMPLE_MS"  # ms between samples; 0 turns sampling off


def _sample_s() -> float:
    """A micro-batch's activations live for tens of ms or more (AlexNet at 1 vCPU: 50-200
    ms): a 20 ms grid sees them, at about 50 samples of ~15 µs a second."""
    try:
        return max(0.0, float(os.environ.get(SAMPLE_ENV, "20"))) / 1000
    except ValueError:
        return 0.02


def reset_rss_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so each invocation reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mb() -> float:
    """The process's resident memory now, MiB (psutil, as the calibration has always read
    it: weights and activations are RSS deltas)."""
    import psutil

    return float(psutil.Process().memory_info().rss / 2**20)


def rss_peak_mb() -> float:
    """The process's RSS high-water mark (VmHWM) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.lru_cache(maxsize=1)
def own_cgroup() -> tuple[Path, str] | None:
    """(this process's memory cgroup folder, "v1" or "v2"), looked up once per process:
    at the instance's init, after the local backend has placed it in its cgroup."""
    d2 = own_v2_dir()
    if d2 is not None and (d2 / "memory.peak").exists():
        return d2, "v2"
    d1 = own_v1_dir("memory")
    if d1 is not None and (d1 / "memory.max_usage_in_bytes").exists():
        return d1, "v1"
    return None


def _exclusive(folder: Path) -> bool:
    """The cgroup holds only this process and its ancestors (a Lambda sandbox, a local
    backend instance), so its charge is this function's; not so in a shared container."""
    try:
        procs = [int(x) for x in (folder / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return False
    return bool(procs) and set(procs) <= _self_and_ancestors()


def _self_and_ancestors() -> set[int]:
    """This process and its ancestors, from /proc (a few small reads, no scan of all pids)."""
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def cgroup_peak_mb() -> float | None:
    """The peak charge of this process's cgroup, or None when it is not this function's
    alone or cannot be read."""
    found = own_cgroup()
    if found is None or not _exclusive(found[0]):
        return None
    folder, version = found
    name = "memory.peak" if version == "v2" else "memory.max_usage_in_bytes"
    try:
        return int((folder / name).read_text().split()[0]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        return None


class ChargeSampler:
    """Samples the cgroup's unreclaimable charge (charge − file cache) on a thread while a
    block runs; `peak_mb` is its highest value, None without a cgroup of our own.

    A thread, because no kernel counter keeps the peak of this difference; it sleeps
    between samples and needs no GIL while onnxruntime computes, which is when activations
    peak. The two reads take ~15 µs, but a wake of the thread costs ~0.2-0.3 ms of CPU in
    all: 1.5% of a core at 20 ms, hence the longer interval under a smaller quota
    (runtime/cpu.per_quota).
    """

    def __init__(self, interval_s: float | None = None):
        self.interval_s = per_quota(_sample_s()) if interval_s is None else interval_s
        self.peak_mb: float | None = None
        self._fds: tuple[int, int] | None = None
        self._keys: tuple[bytes, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        found = own_cgroup()
        if self.interval_s <= 0 or found is None or not _exclusive(found[0]):
            return
        folder, version = found
        usage = "memory.current" if version == "v2" else "memory.usage_in_bytes"
        # v1 memory.stat lists the cgroup's own counters first and total_* (with children)
        # after; an instance's cgroup has no children, so the plain names are the same.
        self._keys = (b"active_file", b"inactive_file")
        try:
            self._fds = (os.open(folder / usage, os.O_RDONLY),
                         os.open(folder / "memory.stat", os.O_RDONLY))
        except OSError:
            self._fds = None

    def sample(self) -> float | None:
        """The unreclaimable charge now, in MiB (None without a cgroup to read)."""
        if self._fds is None:
            return None
        try:
            usage = int(os.pread(self._fds[0], 64, 0).split()[0])
            stat = os.pread(self._fds[1], 1 << 14, 0)
        except (OSError, ValueError, IndexError):
            return None
        cache = 0
        for line in stat.splitlines():
            key, _, value = line.partition(b" ")
            if key in self._keys:
                cache += int(value)
        mb = max(0, usage - cache) / (1 << 20)
        if self.peak_mb is None or mb > self.peak_mb:
            self.peak_mb = mb
        return mb

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> ChargeSampler:
        if self._fds is not None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="charge-sampler",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


def enforced_peak_mb(rss_peak: float, charge_peak: float | None) -> float:
    """What the cap is held to: the unreclaimable charge's peak where one was sampled,
    never below the RSS peak (pages of shared libraries are charged to whoever first read
    them, so a cgroup can be charged less than the process maps)."""
    return rss_peak if charge_peak is None else max(rss_peak, charge_peak)
