import os

import pytest

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
    assert lay.log == "demo/invocations.jsonl"


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
