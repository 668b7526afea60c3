"""Stage models are content-addressed and shared: setup is paid once per model and cuts."""

from __future__ import annotations

import json
import logging

import onnx
import pytest
from helpers import rows_of, tiny_conv_classifier

from serveless.backends.local import LocalBackend
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.errors import JobError
from serveless.model.stagestore import stage_digest
from serveless.store import JobLayout, ModelLayout, Store


class CountingStore(Store):
    """Records the key of every object written."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: list[str] = []

    def put_file(self, local, key):
        self.written.append(key)
        super().put_file(local, key)

    def put_bytes(self, key, data):
        self.written.append(key)
        super().put_bytes(key, data)


@pytest.mark.e2e
def test_second_job_with_the_same_model_and_cuts_does_no_partition_and_no_upload(
        tmp_path, records_dir, model_file, counted_partition, caplog):
    store = CountingStore(str(tmp_path / "store"))
    caplog.set_level(logging.INFO, logger="serveless.model.stagestore")
    first = prepare_job(store, "a", str(model_file), cuts="r1", records=str(records_dir))
    assert counted_partition == [["r1"]]
    uploaded = [k for k in store.written if k.startswith("models/")]
    assert first.models.startswith("models/")
    assert {k.rsplit("/", 1)[-1] for k in uploaded} == {
        "stage-0.onnx", "stage-0.onnx.data", "stage-1.onnx", "manifest.json"}  # stage 1 < 1 KB
    assert "partitioned, checked and uploaded" in caplog.text

    store.written.clear()
    caplog.clear()
    second = prepare_job(store, "b", str(model_file), cuts="r1", records=str(records_dir))
    assert counted_partition == [["r1"]]  # no second partition (nor equivalence check)
    assert not [k for k in store.written if k.startswith("models/")]  # no upload
    assert "reused: no partition, no upload" in caplog.text
    assert second.models == first.models
    saved = json.loads(store.get_bytes(JobLayout("b").spec))
    assert saved["models"] == first.models  # job.json points at the shared set

    with LocalBackend() as backend:  # the second job runs on the shared stages
        result = run_job(store, second, backend, concurrency=2, progress=False)
    assert result.ok and len(rows_of(store, "b")) == 60
    assert not store.exists(JobLayout("b").key("model"))

    other = prepare_job(store, "c", str(model_file), cuts="g", records=str(records_dir))
    assert counted_partition == [["r1"], ["g"]]  # other cuts: other stages
    assert other.models != first.models


@pytest.mark.e2e
def test_damaged_stage_models_are_rebuilt(tmp_path, records_dir, model_file, counted_partition):
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "a", str(model_file), cuts="r1", records=str(records_dir))
    data_key = spec.stage_model_key(0) + ".data"
    path = tmp_path / "store" / data_key
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF  # same size, other bytes: only the hash can tell
    path.write_bytes(bytes(raw))
    prepare_job(store, "b", str(model_file), cuts="r1", records=str(records_dir))
    assert len(counted_partition) == 2
    assert (tmp_path / "store" / data_key).read_bytes() != bytes(raw)
    (tmp_path / "store" / spec.stage_model_key(1)).unlink()  # a missing file
    prepare_job(store, "c", str(model_file), cuts="r1", records=str(records_dir))
    assert len(counted_partition) == 3
    prepare_job(store, "d", str(model_file), cuts="r1", records=str(records_dir))
    assert len(counted_partition) == 3  # whole again: reused
    with LocalBackend() as backend:
        assert run_job(store, JobSpec.load(store, "d"), backend, progress=False).ok


def test_digest_covers_model_cuts_and_extra():
    base = stage_digest("ab" * 32, ["pool1"])
    assert len(base) == 64 and ModelLayout(base).stage(2) == f"models/{base}/stage-2.onnx"
    assert stage_digest("ab" * 32, ["pool1"]) == base
    assert stage_digest("cd" * 32, ["pool1"]) != base
    assert stage_digest("ab" * 32, ["pool2"]) != base
    assert stage_digest("ab" * 32, ["pool1"], {"quantize": "int8"}) != base
    with pytest.raises(ValueError):
        ModelLayout("../../etc")


def test_a_job_cannot_be_named_like_the_models_folder(tmp_path, records_dir):
    with pytest.raises(ValueError, match="stage models"):
        prepare_job(Store(str(tmp_path)), "models", "alexnet", records=str(records_dir))


def test_resume_refuses_a_model_file_that_changed(tmp_path, records_dir, model_file):
    store = Store(str(tmp_path / "store"))
    prepare_job(store, "a", str(model_file), cuts="r1", records=str(records_dir))
    onnx.save(tiny_conv_classifier(channels=8), model_file)  # same path, other weights
    with pytest.raises(JobError, match="changed"):
        prepare_job(store, "a", str(model_file), cuts="r1", records=str(records_dir))
