"""Local function instances live as long as their backend and leave nothing behind (issue
21): a backend reused for a second job keeps its warm instances; each instance's temporary
folder goes when it stops, and those of a driver that was killed are swept. And an
internal error is one line."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from datakit import image_folder, save, tiny_classifier

from serveless.backends.local import LocalBackend
from serveless.backends.local import backend as local
from serveless.data.sources import pack
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.store import Store

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_jobs(tmp_path):
    image_folder(tmp_path / "imgs", per_class=2)
    pack(tmp_path / "imgs", Store(str(tmp_path / "recs")), "", 2)
    model = save(tiny_classifier(), tmp_path / "tiny.onnx")
    st = Store(str(tmp_path / "st"))
    return st, [prepare_job(st, j, model, cuts="r1", records=str(tmp_path / "recs"))
                for j in ("a", "b")]


def test_a_backend_reused_for_a_second_job_keeps_its_warm_instances(two_jobs):
    st, specs = two_jobs
    with LocalBackend() as backend:
        first = run_job(st, specs[0], backend, concurrency=1, progress=False)
        second = run_job(st, specs[1], backend, concurrency=1, progress=False)
        assert first.ok and second.ok
        assert any(r["cold"] for r in first.rows)
        assert not any(r["cold"] for r in second.rows), "the second job started cold"
        ids = {r["instance"] for r in first.rows} & {r["instance"] for r in second.rows}
        assert len(ids) == 2  # the same two instances (one per stage) served both jobs


def test_each_instance_has_a_temporary_folder_that_goes_with_it(two_jobs):
    st, specs = two_jobs
    backend = LocalBackend(keep_alive_s=0.0)  # idle instances stop at the next call
    try:
        root = Path(backend.tmp_root)
        first = run_job(st, specs[0], backend, concurrency=1, progress=False)
        assert first.ok
        assert run_job(st, specs[1], backend, concurrency=1, progress=False).ok
        alive = {i.id for idle in backend._idle.values() for i in idle}
        alive |= {i.id for i in backend._busy}
        stopped = {r["instance"] for r in first.rows} - alive
        assert stopped, "no instance of the first job was stopped"
        assert {p.name for p in root.iterdir()} == alive  # the stopped ones' folders are gone
    finally:
        backend.close()
    assert not root.exists() and not Path(backend.model_cache).exists()


def test_the_folders_of_a_killed_driver_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = Path(tempfile.gettempdir())
    leftovers = [tmp / f"serveless-instances-{dead.pid}-0123abcd",
                 tmp / f"serveless-models-{dead.pid}-0123abcd"]
    for folder in leftovers:
        (folder / "stage0-1769mb-1").mkdir(parents=True, exist_ok=True)
        old = time.time() - local.STALE_CACHE_S - 60
        os.utime(folder, (old, old))
    assert local.remove_stale_caches() >= 2
    assert not any(f.exists() for f in leftovers)


def test_an_internal_error_is_one_line():
    code = ("import sys; sys.argv = ['serveless', 'jobs', '--store', sys.argv[1]]\n"
            "import serveless.driver.jobs as jobs\n"
            "def boom(*a, **k): raise RuntimeError('boom')\n"
            "jobs.list_jobs = boom\n"
            "from serveless.cli import main\n"
            "main()")
    with tempfile.TemporaryDirectory() as store:
        res = subprocess.run([sys.executable, "-c", code, store], capture_output=True,
                             text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: internal error: RuntimeError: boom (run again with 'serveless --debug …' for "
        "the traceback, and please report it)"]
    assert "Traceback" not in res.stdout + res.stderr
