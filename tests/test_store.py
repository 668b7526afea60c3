"""The store (store/): job names that cannot escape, the layout's keys, atomic writes, a
memory store; and the checks made before a job that need no server: a local folder is
checked without writing, an unreachable S3 endpoint is said as such."""

from __future__ import annotations

import os

import pytest

from serveless.errors import StoreError
from serveless.store import JobLayout, Store, validate_job_name


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "a\\b", ".hidden", "x" * 200])
def test_job_names_that_escape_are_refused(bad):
    with pytest.raises(ValueError):
        validate_job_name(bad)


def test_layout_keys():
    lay = JobLayout("demo")
    assert lay.record("00001") == "demo/records/00001.tfrecord"
    assert lay.stage_output(2, "00001") == "demo/stage-2/00001.npy"
    assert lay.stage_model(0) == "demo/model/stage-0.onnx"
    assert lay.predictions("r") == "demo/predictions/r.jsonl"
    assert lay.log_segment("run1", 3) == "demo/log/run1-000003.jsonl"
    assert lay.log_run("run1") == "demo/log/run1.jsonl"
    assert lay.legacy_log == "demo/invocations.jsonl"  # read, from jobs before segments
    assert lay.lease == "demo/lease"


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    st = Store(str(tmp_path))
    with pytest.raises(RuntimeError), st.writer("j/a.bin") as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert not st.exists("j/a.bin")
    assert os.listdir(tmp_path / "j") == []
    with st.writer("j/a.bin") as f:
        f.write(b"whole")
    assert st.get_bytes("j/a.bin") == b"whole"
    assert st.list("j") == ["j/a.bin"]


def test_memory_store_round_trip():
    st = Store("memory://serveless-test-store")
    st.put_bytes("k/x.txt", b"hello")
    assert st.get_bytes("k/x.txt") == b"hello"
    assert st.size("k/x.txt") == 5
    assert not st.local


FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


def test_check_of_local_folders_writes_nothing(tmp_path):
    Store(str(tmp_path / "new" / "nested")).check()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        Store(str(tmp_path / "file")).check()
    Store("memory://serveless-check-test").check()


def test_unreachable_endpoint_is_a_clear_store_error():
    st = Store("s3://bucket/prefix", {"endpoint_url": "http://127.0.0.1:9", "key": "a",
                                      "secret": "b", **FAST_FAIL})
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        st.check()
