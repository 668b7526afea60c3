"""One driver per job (issue 21): the lease in the job's folder, taken atomically, renewed,
taken over when its driver is gone, and what a second driver is told."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from serveless.driver import lease as lease_mod
from serveless.driver.lease import JobLease, read_lease
from serveless.errors import JobError
from serveless.store import JobLayout, Store

pytest_plugins = ["s3server"]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_server):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    return Store(s3_server.url(f"lease-{uuid.uuid4().hex[:8]}"), s3_server.options())


def test_a_second_driver_is_refused_with_the_holder_named(store):
    first = JobLease(store, "j").acquire()
    try:
        held = read_lease(store, "j")
        assert held["pid"] == os.getpid() and held["token"] == first.token
        with pytest.raises(JobError, match=r"run by another driver \(host .*, pid "
                                           rf"{os.getpid()}, since .*renewed \d+ s ago\)"):
            JobLease(store, "j").acquire()
    finally:
        first.release()
    assert read_lease(store, "j") is None  # released: nothing left of it
    with JobLease(store, "j"):  # and free for the next driver
        pass


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(store, monkeypatch):
    old = JobLease(store, "j").acquire()
    old._stop.set()  # it stops renewing, as a killed driver does
    layout = JobLayout("j")
    data, version = store.read_versioned(layout.lease)
    stale = json.loads(data)
    stale.update(renewed=time.time() - lease_mod.TTL_S - 5, pid=1)  # long ago, elsewhere
    stale["host"] = "another-host"
    assert store.replace(layout.lease, json.dumps(stale).encode(), version)
    said: list[str] = []
    new = JobLease(store, "j", say=said.append).acquire()
    try:
        assert said and said[0].startswith("took over job 'j' from a driver that stopped")
        assert "another-host" in said[0] and "expired" in said[0]
        assert not old.renew() and "another driver took its lease" in old.lost
        assert new.renew() and read_lease(store, "j")["token"] == new.token
    finally:
        new.release()
        old.release()  # a lost lease is not removed by its old holder
    assert read_lease(store, "j") is None


def test_a_lease_whose_process_here_is_gone_is_not_waited_out(tmp_path):
    store = Store(str(tmp_path))
    code = ("import os,sys; from serveless.store import Store; "
            "from serveless.driver.lease import JobLease; "
            "JobLease(Store(sys.argv[1]), 'j').acquire(); os._exit(0)")  # dies holding it
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    held = read_lease(store, "j")
    assert held is not None and time.time() - held["renewed"] < lease_mod.TTL_S
    said: list[str] = []
    with JobLease(store, "j", say=said.append):
        assert said and "took over" in said[0]


def test_two_processes_racing_for_one_job_one_wins(tmp_path):
    code = ("import sys,time; from serveless.store import Store; "
            "from serveless.driver.lease import JobLease; from serveless.errors import JobError\n"
            "t = float(sys.argv[2])\n"
            "while time.time() < t: pass\n"
            "try:\n"
            "    lease = JobLease(Store(sys.argv[1]), 'j').acquire(); print('won'); "
            "time.sleep(1.5); lease.release()\n"
            "except JobError as e: print('refused')")
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["refused", "refused", "refused", "won"]


def test_a_lease_is_renewed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "RENEW_S", 0.1)
    store = Store(str(tmp_path))
    with JobLease(store, "j"):
        first = read_lease(store, "j")["renewed"]
        time.sleep(0.5)
        assert read_lease(store, "j")["renewed"] > first
