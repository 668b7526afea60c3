"""Resume: a changed record is found by its content, not its size, and the temporaries of
writers that were killed are removed from the job (and only from the job)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_changed_record_of_the_same_size_is_refused(tmp_path, records_dir, s3_server, where):
    store = (Store(str(tmp_path / "store")) if where == "local"
             else Store(s3_server.url(f"resume-{tmp_path.name}"), s3_server.options()))
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


def test_stale_temporaries_on_s3_stay_inside_the_job(s3_server):
    store = Store(s3_server.url("tmps"), s3_server.options())
    for key in ["j/a.npy.tmp-1", "j2/a.npy.tmp-2", "j/a.npy"]:
        store.put_bytes(key, b"x")
    assert store.stale_temporaries("j") == ["j/a.npy.tmp-1"]


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
