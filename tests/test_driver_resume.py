"""Resume: a job run again (or a driver killed and started again) does only what is left,
trusting an output only whole by its checksum; a changed record is found by its content,
not its size; other settings are refused while a raised memory is kept; and the
temporaries of writers that were killed are removed from the job (and only from the job)."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import assert_one_row_per_image, rows_of, run_cli

from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.errors import JobError
from serveless.store import Store

pytest_plugins = ["s3server"]


def _same_size_other_content(src: Path, dest: Path) -> None:
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside an image: the size is unchanged
    dest.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.e2e)])
def test_a_changed_record_of_the_same_size_is_refused(tmp_path, records_dir, request, where):
    if where == "local":  # the S3 server only where it is used
        store = Store(str(tmp_path / "store"))
    else:
        s3_server = request.getfixturevalue("s3_server")
        store = Store(s3_server.url(f"resume-{tmp_path.name}"), s3_server.options())
    prepare_job(store, "r", "alexnet", preset="paper", records=str(records_dir))
    changed = tmp_path / "changed"
    shutil.copytree(records_dir, changed)
    first = sorted(changed.glob("*.tfrecord"))[0]
    _same_size_other_content(records_dir / first.name, first)
    assert first.stat().st_size == (records_dir / first.name).stat().st_size
    with pytest.raises(JobError, match=f"different record '{first.stem}'"):
        prepare_job(store, "r", "alexnet", preset="paper", records=str(changed))
    # the same records again: a resume, accepted
    prepare_job(store, "r", "alexnet", preset="paper", records=str(records_dir))


class _Idle:
    name = "idle"

    def describe(self) -> dict:
        return {"backend": self.name, "cpu_share": "n/a"}

    def invoke(self, fn, event):  # pragma: no cover - the job below has nothing to run
        raise AssertionError("nothing to invoke")

    def close(self) -> None:
        pass


def test_resume_removes_the_jobs_stale_temporaries_only(tmp_path):
    store = Store(str(tmp_path))
    mine = ["j/stage-0/r.npy.tmp-0123abcd", "j/predictions/r.jsonl.tmp-ffff", "j/x.tmp-1"]
    theirs = ["j2/stage-0/r.npy.tmp-0123abcd", "other/j/a.tmp-2"]
    for key in [*mine, *theirs, "j/stage-0/r.npy"]:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"half")
    assert sorted(store.stale_temporaries("j")) == sorted(mine)
    spec = JobSpec(job="j", model="alexnet", cuts=[], memory=[1769], records=[])
    run_job(store, spec, _Idle(), progress=False)
    assert not any((tmp_path / key).exists() for key in mine)
    assert all((tmp_path / key).exists() for key in theirs)
    assert (tmp_path / "j/stage-0/r.npy").exists()


def test_outputs_are_checked_whole_by_their_crc32c_and_old_logs_by_sha256(tmp_path):
    """Resume trusts an output only with the size and checksum its writer logged: CRC32C
    now, SHA-256 in logs from before; a same-size corruption is caught by either."""
    import hashlib

    from serveless.data.tensors import TensorFormat
    from serveless.driver.resume import whole as _whole
    from serveless.runtime.counters import Counters as _Counters
    from serveless.runtime.outputs import write_tensor as _write_tensor

    store = Store(str(tmp_path))
    blocks = [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.ones((1, 3, 4), np.float32)]
    out = _write_tensor(store, "j/stage-0/r.npy", 3, iter(blocks), TensorFormat(), _Counters())
    data = store.get_bytes(out["key"])
    assert set(out) == {"key", "size", "crc32c"} and out["size"] == len(data)
    assert _whole(store, out)
    legacy = {"key": out["key"], "size": out["size"],
              "sha256": hashlib.sha256(data).hexdigest()}
    assert _whole(store, legacy)
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    store.put_bytes(out["key"], bytes(flipped))
    assert not _whole(store, out) and not _whole(store, legacy)
    store.put_bytes(out["key"], data[:-4])
    assert not _whole(store, out)


@pytest.mark.e2e
def test_driver_sigkilled_then_resumed(tmp_path, records_dir):
    store_dir = tmp_path / "store"
    args = ("run", "--store", str(store_dir), "--job", "resume", "--records", str(records_dir),
            "--preset", "paper", "--concurrency", "1")
    proc = run_cli(*args)

    def finished() -> set[str]:
        """Records whose last stage (3 of the paper preset) the driver logged as done: what
        resume must not redo. A predictions object can exist a few ms before its row is
        logged; a record killed in that window is rightly redone (judged by the objects,
        this test failed 2 runs in 9 here)."""
        return {r["record"] for r in load_log(Store(str(store_dir)), "resume")
                if r["stage"] == 3 and r.get("error") is None}

    deadline = time.time() + 240
    while time.time() < deadline and not finished():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done_before = finished()
    assert done_before and len(done_before) < 3, "kill the driver mid-job"
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "function instances outlived the killed driver"
    rows_before = len(load_log(Store(str(store_dir)), "resume"))

    again = run_cli(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    store = Store(str(store_dir))
    assert_one_row_per_image(rows_of(store, "resume"), 60)
    new_rows = load_log(store, "resume")[rows_before:]
    assert new_rows, "the second run did nothing"
    recomputed = {r["record"] for r in new_rows} & done_before
    assert not recomputed, f"records done before the kill were recomputed: {recomputed}"


def test_resume_refuses_other_settings_and_keeps_raised_memory(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "re", "alexnet", preset="paper", records=str(records_dir))
    spec.memory = [1769, 1769, 1769, 576]  # as after an OutOfMemory raise
    spec.save(store)
    with pytest.raises(JobError, match="cuts"):
        prepare_job(store, "re", "alexnet", cuts="pool2", records=str(records_dir))
    again = prepare_job(store, "re", "alexnet", preset="paper", records=str(records_dir))
    assert again.memory == [1769, 1769, 1769, 576]
    explicit = prepare_job(store, "re", "alexnet", preset="paper", memory="2048",
                           records=str(records_dir))
    assert explicit.memory == [2048] * 4
