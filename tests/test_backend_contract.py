"""One contract, every backend: the same checks run against the local backend and the Lithops
backend on Lithops' localhost engine, as fsspec runs one abstract test suite against every
filesystem. A backend must answer a stage invocation with the handler's metrics and say
whether it was a cold start (with its init) or a warm one; return a handler's error as
data, with its kind and message, and serve the next call; mark a deterministic error final
and not retryable; run a whole job through driver.scheduler.run_job to one prediction row
per image equal to the whole model; and refuse to invoke once closed.

Where a backend keeps instances warm (local) the second call of a function is warm, on the
same instance; Lithops' localhost engine (version 1) starts a process per call, so every
call is cold with its own init: `Contract.keeps_instances` says which to expect. The store
is a local folder, which both reach; the model is helpers.tiny_conv_classifier cut at "r1"
(two stages on 32×32 images), so each call takes a fraction of a second of work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
from helpers import check_predictions, small_records, tiny_conv_classifier

from serveless.backends import FunctionSpec, InvocationResult
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.runtime.protocol import DETERMINISTIC
from serveless.store import Store

pytestmark = pytest.mark.e2e

BACKENDS = ["local", "lithops"]


@dataclass
class Contract:
    """A backend under test, and what its platform makes of warm starts."""

    name: str
    backend: Any
    keeps_instances: bool


def make_backend(name: str) -> Contract:
    if name == "local":
        from serveless.backends.local import LocalBackend

        return Contract(name, LocalBackend(), keeps_instances=True)
    pytest.importorskip("lithops")
    from serveless.backends.lithops import LithopsBackend

    return Contract(name, LithopsBackend({"backend": "localhost"}), keeps_instances=False)


@pytest.fixture(scope="module", params=BACKENDS)
def contract(request) -> Iterator[Contract]:
    """Each backend in turn, started once for the module's checks and closed after."""
    c = make_backend(request.param)
    try:
        yield c
    finally:
        c.backend.close()


@dataclass
class Setup:
    store: Store
    records: Path
    model: onnx.ModelProto
    model_path: Path
    spec: JobSpec


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """A local-folder store with the two-stage job 'contract' prepared (not run): 20 sample
    photos in 2 records of 10."""
    root = tmp_path_factory.mktemp("contract")
    records = small_records(root, seed=17)
    model = tiny_conv_classifier()
    path = root / "tiny.onnx"
    onnx.save(model, path)
    store = Store(str(root / "store"))
    spec = prepare_job(store, "contract", str(path), cuts="r1", records=str(records))
    return Setup(store, records, model, path, spec)


def invoke(c: Contract, s: Setup, memory: int = 1769, stage: int = 0,
           **event: Any) -> InvocationResult:
    """One invocation of a stage of the prepared job (record 00000 unless told)."""
    fn = FunctionSpec(stage=stage, memory_mb=memory, model_key=s.spec.stage_model_key(stage),
                      store=s.store.spec())
    return c.backend.invoke(fn, {"store": s.store.spec(), "job": s.spec.job, "stage": stage,
                                 "stages": s.spec.stages, "record": s.spec.records[0],
                                 "size": s.spec.input_hw, "memory_mb": memory,
                                 "model": fn.model_key, **event})


def test_an_invocation_returns_its_metrics_and_says_cold_then_warm(contract, setup):
    first = invoke(contract, setup, memory=1771)  # a size no other check uses: a new function
    assert first.ok, first.error
    m = first.metrics
    assert m["stage"] == 0 and m["record"] == "00000" and m["images"] == 10
    assert m["duration_ms"] > 0 and m["bytes_in"] > 0 and m["gets"] >= 1 and m["puts"] >= 1
    out = m["output"]
    assert setup.store.size(out["key"]) == out["size"] > 0
    assert first.duration_ms > 0 and first.peak_mb is not None and first.peak_mb > 0
    assert first.cold and first.init_ms > 0 and first.instance
    second = invoke(contract, setup, memory=1771)
    assert second.ok, second.error
    assert second.metrics["output"]["crc32c"] == out["crc32c"]  # the same work, the same bytes
    if contract.keeps_instances:
        assert not second.cold and second.init_ms == 0 and second.instance == first.instance
    else:
        assert second.cold and second.init_ms > 0 and second.instance != first.instance


def test_a_handler_error_comes_back_as_data_with_its_kind(contract, setup):
    res = invoke(contract, setup, record="no-such-record")
    assert not res.ok and res.error.type == "StoreError"
    assert "no-such-record" in res.error.message
    assert res.error.retryable  # a store error may pass: the driver tries again
    again = invoke(contract, setup)  # the instance (where kept) survived and serves the next
    assert again.ok, again.error
    if contract.keeps_instances:
        assert not again.cold


def test_a_deterministic_error_is_final_and_not_retried(contract, setup):
    res = invoke(contract, setup, size=[40, 40])  # the graph takes 32×32: onnxruntime refuses
    assert not res.ok and res.error.type == "InvalidArgument"
    assert res.error.type in DETERMINISTIC
    assert res.error.final and not res.error.retryable
    assert res.error.why and "deterministic" in res.error.why


def test_a_whole_job_gives_one_row_per_image_equal_to_the_whole_model(contract, setup):
    job = f"whole-{contract.name}"  # its own job: the other backend's rows are not its own
    spec = prepare_job(setup.store, job, str(setup.model_path), cuts="r1",
                       records=str(setup.records))
    result = run_job(setup.store, spec, contract.backend, concurrency=2, progress=False)
    assert result.ok and result.images == 20 and result.retried == 0
    check_predictions(setup.store, job, setup.records, setup.model, 20)
    log = load_log(setup.store, job)
    assert sorted((r["record"], r["stage"]) for r in log) == [
        (rec, k) for rec in spec.records for k in range(spec.stages)]
    assert all(r["error"] is None and r["billed_ms"] > 0 for r in log)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_closed_backend_refuses_to_invoke(name, setup):
    c = make_backend(name)
    c.backend.close()
    c.backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        invoke(c, setup)
