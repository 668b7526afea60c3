"""The checks on user models (model/graph.py, model/loading.py): an image model has one
N×3×H×W float input with static H and W and one output; files that are missing, not
ONNX, empty or of the wrong input type are refused with their reason."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from serveless.errors import ModelError
from serveless.model.graph import check_image_model, input_hw, save_model
from serveless.model.loading import load_model


def tiny_image_model(elem=TensorProto.FLOAT, shape=("N", 3, 8, 8), n_inputs=1, n_outputs=1):
    """A one-conv model, optionally with a wrong input type, rank or input/output count."""
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    inputs = [helper.make_tensor_value_info("x", elem, list(shape))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    for i in range(1, n_inputs):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1]))
    for i in range(1, n_outputs):
        nodes.append(helper.make_node("Relu", ["y"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_check_image_model_accepts_alexnet(alexnet):
    assert check_image_model(alexnet) == ("input", (3, 224, 224))
    assert input_hw(alexnet) == (224, 224)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (tiny_image_model(elem=TensorProto.INT64, shape=(1, 3, 8, 8)), ["'x'", "int64"]),
        (tiny_image_model(shape=(1, 10)), ["'x'", "[1, 10]", "N×3×H×W"]),
        (tiny_image_model(shape=("N", 1, 8, 8)), ["'x'", "['N', 1, 8, 8]"]),
        (tiny_image_model(shape=("N", 3, "H", "W")), ["static H and W", "'H'"]),
        (tiny_image_model(n_inputs=2), ["exactly one input", "'x1'"]),
        (tiny_image_model(n_outputs=2), ["exactly one output", "'y1'"]),
    ],
)
def test_check_image_model_refuses(model, words):
    with pytest.raises(ModelError) as err:
        check_image_model(model)
    for w in words:
        assert w in str(err.value)


def test_initializer_inputs_do_not_count():
    model = tiny_image_model()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 1, 1]))
    assert check_image_model(model) == ("x", (3, 8, 8))


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_image_model()
    path = save_model(model, tmp_path / "sub" / "tiny.onnx")
    loaded = load_model(str(path))
    assert loaded.SerializeToString() == model.SerializeToString()
    assert input_hw(loaded) == (8, 8)


def test_load_model_refuses_bad_files(tmp_path):
    with pytest.raises(ModelError, match="model file not found: .*nope.onnx"):
        load_model(str(tmp_path / "nope.onnx"))
    with pytest.raises(ModelError, match="not a file"):
        load_model(str(tmp_path))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe this is not protobuf \x00\x01")
    with pytest.raises(ModelError, match="garbage.onnx"):
        load_model(str(garbage))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="no nodes"):
        load_model(str(empty))
    bad = tmp_path / "int.onnx"
    save_model(tiny_image_model(elem=TensorProto.INT64), bad)
    with pytest.raises(ModelError, match="int64"):
        load_model(str(bad))
