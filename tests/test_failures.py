"""How failures are classified: a Python MemoryError is out of memory, deterministic
failures are not retried and say why, and a predictions object is never short."""

from __future__ import annotations

import numpy as np
import pytest

from serveless.backends import FunctionSpec
from serveless.backends.local import LocalBackend
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.errors import PredictionCountError
from serveless.runtime.counters import Counters as _Counters
from serveless.runtime.outputs import write_predictions as _write_predictions
from serveless.runtime.protocol import error_of
from serveless.store import Store


@pytest.fixture(scope="module")
def job(tmp_path_factory, records_dir):
    store = Store(str(tmp_path_factory.mktemp("failures")))
    spec = prepare_job(store, "f", "alexnet", preset="paper", records=str(records_dir))
    return store, spec


def test_a_memory_error_in_the_function_is_out_of_memory(job):
    """A batch too large to allocate (an absurd input size) raises MemoryError inside the
    instance: the driver must see OutOfMemory (and raise the memory), as for an OOM kill."""
    store, spec = job
    fn = FunctionSpec(stage=0, memory_mb=1024, model_key=spec.stage_model_key(0),
                      store=store.spec())
    event = {"store": store.spec(), "job": "f", "stage": 0, "stages": spec.stages,
             "record": spec.records[0], "size": [200_000, 200_000], "model": fn.model_key}
    with LocalBackend() as backend:
        result = backend.invoke(fn, event)
    assert result.error is not None and result.error.type == "OutOfMemory"
    assert "MemoryError" in result.error.message
    assert error_of(MemoryError()).type == "OutOfMemory"


def test_a_deterministic_failure_is_not_retried_and_says_why(job):
    """Records run at a size the model refuses: onnxruntime's InvalidArgument comes out the
    same every time, so each record is tried once, and the failure says why."""
    store, spec = job
    spec.input_hw = [200, 180]  # AlexNet's graph takes 224x224
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, retries=3, progress=False)
    log = load_log(store, "f")
    assert len(log) == len(spec.records) and result.retried == 0
    assert set(result.failed_records) == set(spec.records)
    for why in result.failed_records.values():
        assert why.startswith("stage 0: InvalidArgument") and "not retried: deterministic" in why
    assert all(r["error"]["final"] for r in log)


def test_a_short_predictions_object_is_never_written(tmp_path):
    """Fewer rows than the record has images: an error, and no predictions object at all."""
    store = Store(str(tmp_path))
    meta = {"n": 5, "filenames": [f"{i}.jpg" for i in range(5)], "labels": [0] * 5,
            "errors": {}}
    outputs = iter([np.random.default_rng(0).random((3, 10), np.float32)])
    with pytest.raises(PredictionCountError, match="3 predictions for 5 images"):
        _write_predictions(store, "j/predictions/r.jsonl", "r", outputs, meta, _Counters())
    assert not store.exists("j/predictions/r.jsonl")
    assert error_of(PredictionCountError("x")).final is True
