"""Honest figures: threads follow the function's vCPUs on every backend, the CPU share is
called exact only when a quota was written, and peak memory is what the runtime enforces."""

from __future__ import annotations

import os
from typing import Any

import pytest

from serveless.backends import FunctionSpec, InvocationResult
from serveless.backends.local import LocalBackend
from serveless.backends.local import isolation as L
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.store import Store


class _Recording:
    """A backend that records what it is asked to run and fails every call for good."""

    name = "recording"

    def __init__(self, cores: int | None):
        self.cores = cores
        self.threads: list[tuple[int, int, int]] = []

    def function_cores(self) -> int | None:
        return self.cores

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "cpu_share": "n/a"}

    def invoke(self, fn: FunctionSpec, event: dict[str, Any]) -> InvocationResult:
        self.threads.append((fn.memory_mb, fn.threads, event["threads"]))
        return InvocationResult(None, {"type": "ValueError", "message": "recorded"}, False,
                                0.0, 0.0, None)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("cores", "memory", "threads"), [
    (None, 10240, 6),  # a cloud function: its own 6 vCPUs, whatever the driver has
    (None, 3538, 2),
    (None, 1024, 1),
    (1, 10240, 1),  # a local engine on a 1-core machine: at most its cores
])
def test_threads_follow_the_functions_vcpus(tmp_path, cores, memory, threads):
    store = Store(str(tmp_path))
    spec = JobSpec(job="t", model="alexnet", cuts=[], memory=[memory], records=["r"])
    backend = _Recording(cores)
    run_job(store, spec, backend, retries=0, progress=False)
    assert backend.threads == [(memory, threads, threads)]


def test_lithops_on_a_cloud_gives_functions_their_own_vcpus():
    pytest.importorskip("lithops")
    from serveless.backends.lithops import LithopsBackend

    backend = object.__new__(LithopsBackend)  # no sidecar: only the rule is looked at
    backend.compute = "aws_lambda"
    assert backend.function_cores() is None
    backend.compute = "localhost"
    assert backend.function_cores() == os.cpu_count()


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
