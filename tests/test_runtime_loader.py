"""Where calls do not share a process (Lithops), a stage's files are cached on the
function's local disk, named by their content: later calls load from disk without a GET,
a changed stage is fetched again, and every invocation says where its model came from."""

from __future__ import annotations

import numpy as np
import pytest

from serveless.backends import FunctionSpec
from serveless.backends.local import LocalBackend
from serveless.data.samples import make_sample_images
from serveless.data.sources import pack
from serveless.driver.prepare import prepare_job
from serveless.runtime import handler, loader
from serveless.runtime.protocol import MODEL_CACHE_ENV
from serveless.store import Store
from serveless.store.layout import DATA_SUFFIX

pytest_plugins = ["s3server", "faultproxy"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_sample_images(root / "images", 4, classes=2, seed=3)
    pack(root / "images", Store(str(root / "records")), "", 4)
    return root / "records"


def test_a_fresh_process_loads_its_stage_from_disk_not_the_store(
        s3_server, s3_proxy, tiny_records, tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    st = Store(s3_server.url("cache"), s3_server.options(endpoint_url=s3_proxy.endpoint))
    spec = prepare_job(st, "c", "alexnet", preset="paper", records=str(tiny_records))
    last = spec.stages - 1
    event = {"store": st.spec(), "job": "c", "stage": 0, "stages": spec.stages,
             "record": spec.records[0], "size": spec.input_hw}

    def at(stage: int) -> dict:
        return {**event, "stage": stage, "model": spec.stage_model_key(stage)}

    for stage in range(last):  # the inputs of the last stage
        loader._SESSIONS.clear()
        handler.handle(at(stage))
    model = f"stage-{last}.onnx"  # the graph and its weights (.onnx.data)

    def fresh_call() -> dict:
        loader._SESSIONS.clear()  # as in a new process: nothing in memory
        s3_proxy.clear()
        return handler.handle(at(last))

    first = fresh_call()
    assert first["model_source"] == "store"
    assert len(s3_proxy.seen("GET", model)) == 2  # graph and weights
    second = fresh_call()
    assert second["model_source"] == "disk" and s3_proxy.seen("GET", model) == []
    assert second["bytes_in"] < first["bytes_in"] - 200e6  # the classifier's 234 MB
    assert second["gets"] == len(s3_proxy.seen("GET"))
    assert second["heads"] == len(s3_proxy.seen("HEAD"))
    # same process, same stage: the session itself is kept
    s3_proxy.clear()
    warm = handler.handle(at(last))
    assert warm["model_source"] == "memory" and s3_proxy.seen("GET", model) == []
    # the stage changes in the store (same name): fetched again, never served stale
    weights = st.get_bytes(spec.stage_model_key(last) + DATA_SUFFIX)
    st.put_bytes(spec.stage_model_key(last) + DATA_SUFFIX, weights[:-4] + b"\0\0\0\0")
    changed = fresh_call()
    assert changed["model_source"] == "store"
    assert len(s3_proxy.seen("GET", model)) == 2
    loader._SESSIONS.clear()


def test_local_instances_report_store_then_memory(s3_server, tiny_records):
    st = Store(s3_server.url("cache-local"), s3_server.options())
    spec = prepare_job(st, "cl", "alexnet", preset="paper", records=str(tiny_records))
    fn = FunctionSpec(stage=0, memory_mb=1024, model_key=spec.stage_model_key(0),
                      store=st.spec())
    event = {"store": st.spec(), "job": "cl", "stage": 0, "stages": spec.stages,
             "record": spec.records[0], "size": spec.input_hw, "model": fn.model_key}
    with LocalBackend(max_instances=1) as backend:
        cold = backend.invoke(fn, event)
        warm = backend.invoke(fn, event)
        cache = backend.model_cache
    assert cold.ok and warm.ok and cold.cold and not warm.cold
    assert cold.metrics["model_source"] == "store" and warm.metrics["model_source"] == "memory"
    assert np.isfinite(cold.init_ms) and cold.init_ms > 0
    import os
    assert not os.path.exists(cache)  # the instances' disk cache goes with the backend
