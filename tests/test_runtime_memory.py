"""peak_mb is the charge the memory cap is held to: page cache the kernel can reclaim does
not count, memory charged outside the process's pages (tmpfs, memfd) does, and a brief
allocation is seen. Measured in a child process placed in a cgroup of its own, as a local
backend instance is; and in a job, where each invocation logs that peak beside the cgroup's
raw charge and the RSS high-water mark."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from serveless.backends import FunctionSpec, InvocationResult
from serveless.backends.local import LocalBackend
from serveless.backends.local import isolation as L
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.runtime.memory import ChargeSampler, enforced_peak_mb
from serveless.store import Store

CHILD = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from serveless.runtime.memory import ChargeSampler, cgroup_peak_mb, reset_rss_peak, rss_peak_mb
    sys.stdin.readline()  # placed in the cgroup by now
    out, path, MB = {}, sys.argv[1], 1 << 20

    def measure(name, work):
        reset_rss_peak()
        rss0 = rss_peak_mb()
        with ChargeSampler() as s:
            base = s.sample()
            work()
        out[name] = {"base": base, "peak": s.peak_mb, "rss_growth": rss_peak_mb() - rss0,
                     "cgroup_peak": cgroup_peak_mb()}

    def page_cache():  # 160 MB written to and read back from disk: reclaimable
        block = os.urandom(MB)
        with open(path, "wb") as f:
            for _ in range(160):
                f.write(block)
        with open(path, "rb") as f:
            while f.read(8 * MB):
                pass

    def memfd():  # 120 MB in a memory-backed file, never mapped: charged, not in RSS
        fd = os.memfd_create("charge")
        block = os.urandom(MB)
        for _ in range(120):
            os.write(fd, block)
        time.sleep(0.05)
        os.close(fd)

    def brief():  # 100 MB of activations held for 80 ms (4 samples), then freed
        a = np.ones((100 * MB) // 8)
        time.sleep(0.08)
        del a

    measure("page_cache", page_cache)
    measure("memfd", memfd)
    measure("brief", brief)
    print(json.dumps(out))
""")


@pytest.fixture
def in_cgroup(tmp_path):
    """Run CHILD in a fresh 1 GB memory cgroup; its JSON result."""
    limits = L.InstanceLimits.create("memtest", 1024, 1.0)
    if limits.mode == "watchdog":
        limits.remove()
        pytest.skip(f"no writable memory cgroup here ({limits.reason})")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "big.bin")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        limits.attach(proc.pid)
        out, _ = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
        proc.wait()
        limits.remove()
    assert proc.returncode == 0
    return json.loads(out)


def test_page_cache_does_not_count_but_the_raw_charge_does(in_cgroup):
    r = in_cgroup["page_cache"]
    assert r["cgroup_peak"] is not None and r["cgroup_peak"] - r["base"] >= 140
    assert r["peak"] - r["base"] < 40  # the 160 MB of page cache is not the function's


def test_memory_charged_outside_the_process_pages_counts(in_cgroup):
    r = in_cgroup["memfd"]
    assert r["peak"] - r["base"] >= 110  # 120 MB of shmem: the cap would see it
    assert r["rss_growth"] < 30  # and the RSS high-water mark does not


def test_a_brief_allocation_is_sampled(in_cgroup):
    r = in_cgroup["brief"]
    assert r["peak"] - r["base"] >= 90
    assert r["rss_growth"] >= 90


def test_without_a_cgroup_of_its_own_the_peak_is_the_rss_peak(monkeypatch):
    from serveless.runtime import memory

    monkeypatch.setattr(memory, "own_cgroup", lambda: None)
    with ChargeSampler() as s:
        assert s.sample() is None
    assert s.peak_mb is None
    assert enforced_peak_mb(123.0, s.peak_mb) == 123.0
    assert enforced_peak_mb(123.0, 150.5) == 150.5
    assert enforced_peak_mb(123.0, 99.0) == 123.0


@pytest.mark.parametrize("value,seconds", [(None, 0.02), ("5", 0.005), ("0", 0.0),
                                           ("-3", 0.0), ("often", 0.02)])
def test_sampling_interval_comes_from_the_environment(monkeypatch, value, seconds):
    from serveless.runtime import cpu, memory

    monkeypatch.setattr(cpu, "own_quota", lambda: None)  # whatever cgroup the tests run in
    if value is None:
        monkeypatch.delenv(memory.SAMPLE_ENV, raising=False)
    else:
        monkeypatch.setenv(memory.SAMPLE_ENV, value)
    assert memory._sample_s() == pytest.approx(seconds)
    assert ChargeSampler().interval_s == pytest.approx(seconds)


@pytest.mark.parametrize("quota,seconds", [(None, 0.02), (2.0, 0.02), (1.0, 0.02),
                                           (0.5, 0.04), (0.145, 0.02 / 0.145)])
def test_sampling_is_sparser_under_a_quota_below_a_core(monkeypatch, quota, seconds):
    """The sampler's wakes cost a fixed CPU per wall second (1.5% of a core at 20 ms), so
    below a core its interval grows with 1 / quota: the same share of the function's CPU
    at any quota (runtime/cpu.per_quota)."""
    from serveless.runtime import cpu, memory

    monkeypatch.delenv(memory.SAMPLE_ENV, raising=False)
    monkeypatch.setattr(cpu, "own_quota", lambda: quota)
    assert ChargeSampler().interval_s == pytest.approx(seconds)
    assert ChargeSampler(interval_s=0.005).interval_s == 0.005  # asked for: as asked


@pytest.mark.e2e
def test_peak_is_the_cgroups_charge_with_rss_beside_it(tmp_path, records_dir):
    """Where an instance has a cgroup, its peak charge (what the cap is held to) is logged
    as peak_cgroup_mb beside the RSS high-water mark peak_rss_mb; peak_mb, on which
    memory advice rests, is the charge less reclaimable page cache, never below the RSS
    peak (tests/test_runtime_memory.py checks the measure itself)."""
    store = Store(str(tmp_path))
    spec = prepare_job(store, "p", "alexnet", preset="paper", records=str(records_dir))
    spec.records = spec.records[:1]
    with LocalBackend() as backend:
        if backend.mode == "watchdog":
            pytest.skip("no cgroup here: peak_mb is the RSS peak")
        seen: list[float | None] = []
        real = backend.invoke

        def invoke(fn: FunctionSpec, event: dict[str, Any]) -> InvocationResult:
            res = real(fn, event)
            inst = [i for idle in backend._idle.values() for i in idle if i.id == res.instance]
            seen.append(inst[0].limits.peak_mb() if inst else None)
            return res

        backend.invoke = invoke  # type: ignore[method-assign]
        result = run_job(store, spec, backend, concurrency=1, progress=False)
    assert result.ok
    rows = load_log(store, "p")
    assert len(rows) == spec.stages
    for row, cgroup_peak in zip(rows, seen, strict=True):
        assert cgroup_peak is not None and row["peak_rss_mb"] > 20
        assert row["peak_cgroup_mb"] == pytest.approx(cgroup_peak, abs=0.2)
        ws = row["peak_working_set_mb"]  # sampled in the function: charge less file cache
        assert ws is not None and 0 < ws <= cgroup_peak + 1
        assert row["peak_mb"] == max(row["peak_rss_mb"], ws)
    # (here the charge is below the RSS peak: the libraries and the model file were paged
    # in, and charged, by the driver first; a fresh sandbox is charged for all of them)
