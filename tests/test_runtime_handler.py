"""The function's side, `runtime.handler.handle(event)` called in this process: stage 0
decodes on the calling thread up to 1 vCPU and on a second thread above, with the same
output; the last stage never writes a predictions object shorter than its record."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_conv_classifier

from serveless.driver.prepare import prepare_job
from serveless.errors import PredictionCountError
from serveless.runtime.counters import Counters as _Counters
from serveless.runtime.outputs import write_predictions as _write_predictions
from serveless.runtime.protocol import error_of
from serveless.store import Store


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


def test_stage_0_decodes_inline_up_to_1_vcpu_and_on_a_thread_above(
        tmp_path, records_dir, monkeypatch):
    """At 1 vCPU or less a decode thread cannot overlap the model (one CPU's quota), it
    only switches with it; above, it does. Same outputs either way."""
    import onnx

    from serveless.runtime import handler, loader

    path = tmp_path / "small.onnx"
    onnx.save(tiny_conv_classifier(), path)
    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "inline", str(path), cuts="r1", records=str(records_dir))
    threads: list[int] = []
    real = handler.prefetch

    def spy(blocks, depth=1):
        threads.append(1)
        return real(blocks, depth)

    monkeypatch.setattr(handler, "prefetch", spy)
    record = spec.records[0]
    written = {}
    for memory in (1769, 1770, 512, 3008):
        event = {"store": store.spec(), "job": "inline", "stage": 0, "stages": spec.stages,
                 "record": record, "size": spec.input_hw, "memory_mb": memory,
                 "model": spec.stage_model_key(0)}
        threads.clear()
        out = handler.handle(event)
        written[memory] = out["output"]["crc32c"]
        assert threads == ([1] if memory > 1769 else []), memory
        threads.clear()  # a later stage reads its input on a thread at any size
        handler.handle({**event, "stage": 1, "model": spec.stage_model_key(1)})
        assert threads == [1]
    loader._SESSIONS.clear()
    assert len(set(written.values())) == 1
