"""Experiments keep each model's input H×W (non-square too) for every job they make."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from serveless.experiments import Setup, time_whole_model
from serveless.model.graph import save_model
from serveless.store import Store

H, W = 40, 56


def _non_square_model():
    """Conv -> global average pool -> flatten -> softmax over 4 classes, input 3×40×56."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3))
                                .astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Softmax", ["f"], ["probabilities"], name="softmax")]
    graph = helper.make_graph(
        nodes, "nonsquare",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, H, W])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_every_job_of_an_experiment_keeps_the_models_input_size(tmp_path, records_dir):
    path = save_model(_non_square_model(), tmp_path / "ns.onnx")
    setup = Setup(store=Store(str(tmp_path / "store")), model=str(path), cuts=[])
    first = setup.prepare("first", [512], records_dir)
    second = setup.prepare("second", [1024], records_dir)  # copied from the first
    assert first.input_hw == [H, W] and second.input_hw == [H, W]
    setup.run(second, concurrency=2)
    rows = [r for r in setup.store.get_bytes("second/invocations.jsonl").decode().splitlines()]
    assert rows and all('"error": null' in r for r in rows)
    whole = time_whole_model(str(path), sorted(records_dir.glob("*.tfrecord"))[:1], 8, 1)
    assert whole["records"][0]["images"] == 25
