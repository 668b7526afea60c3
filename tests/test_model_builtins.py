"""The built-in AlexNet (model/builtins.py): its layout, parameters and outputs, determinism
per seed, its on-disk cache, and the paper's preset (model/presets.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from serveless.model.builtins import ALEXNET_VERSION, BUILTIN, build_alexnet
from serveless.model.loading import load_model
from serveless.model.presets import PAPER_PRESET

TENSORS = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "conv4",
           "relu4", "conv5", "relu5", "pool5", "flatten", "fc6", "relu6", "fc7", "relu7", "fc8",
           "probabilities"]


@pytest.fixture(scope="module")
def alexnet() -> onnx.ModelProto:
    return build_alexnet()


@pytest.fixture(scope="module")
def session(alexnet):
    return ort.InferenceSession(alexnet.SerializeToString(), providers=["CPUExecutionProvider"])


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """Blocky, slightly noisy pictures normalised like ImageNet: natural enough for a test."""
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    out = []
    for _ in range(n):
        img = np.kron(rng.uniform(0, 1, (3, 7, 7)), np.ones((32, 32))).astype(np.float32)
        img += rng.normal(0, 0.05, img.shape).astype(np.float32)
        out.append((img - mean) / std)
    return np.stack(out)


def test_alexnet_parameter_count_and_layout(alexnet):
    n = sum(int(np.prod(t.dims)) for t in alexnet.graph.initializer)
    assert n == 61_100_840
    assert [o for node in alexnet.graph.node for o in node.output] == TENSORS
    assert [i.name for i in alexnet.graph.input] == ["input"]
    dims = alexnet.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    out = alexnet.graph.output[0]
    assert out.name == "probabilities"
    assert out.type.tensor_type.shape.dim[0].dim_param == "N"
    assert out.type.tensor_type.shape.dim[1].dim_value == 1000
    assert alexnet.opset_import[0].version == 17
    onnx.checker.check_model(alexnet)
    for t in alexnet.graph.initializer:
        assert t.data_type == TensorProto.FLOAT


def test_num_classes():
    small = build_alexnet(num_classes=10)
    n = sum(int(np.prod(t.dims)) for t in small.graph.initializer)
    assert n == 61_100_840 - 4097 * 990
    assert small.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10


def test_alexnet_outputs_probabilities(session):
    p = session.run(None, {"input": smooth_images(2)})[0]
    assert p.shape == (2, 1000)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (p >= 0).all()


def test_alexnet_softmax_is_not_degenerate(session):
    p = session.run(None, {"input": smooth_images(6, seed=3)})[0]
    top1 = p.max(axis=1)
    assert (top1 < 0.9).all(), top1  # not saturated
    assert (top1 > 5 / 1000).all(), top1  # not flat
    assert len(set(p.argmax(axis=1).tolist())) >= 3  # the answer depends on the image


def test_alexnet_is_deterministic_per_seed(alexnet):
    again = load_model("alexnet")
    assert [t.name for t in again.graph.initializer] == [t.name for t in alexnet.graph.initializer]
    for a, b in zip(again.graph.initializer, alexnet.graph.initializer, strict=True):
        assert a.raw_data == b.raw_data
    other = build_alexnet(seed=1)
    for a, b in zip(other.graph.initializer, alexnet.graph.initializer, strict=True):
        assert a.raw_data != b.raw_data


def test_alexnet_cache_gives_the_generated_model(tmp_path, monkeypatch):
    """The cached file is read back byte-identical to a generated model (same content hash,
    so the same stage models), and a torn file is generated again and replaced."""
    from serveless.model.builtins import _generate_alexnet
    from serveless.paths import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    fresh = _generate_alexnet(seed=2, num_classes=10).SerializeToString(deterministic=True)
    path = tmp_path / f"alexnet-v{ALEXNET_VERSION}-seed2-classes10.onnx"
    assert not path.exists()
    assert build_alexnet(seed=2, num_classes=10).SerializeToString(deterministic=True) == fresh
    assert path.read_bytes() == fresh  # cached as its deterministic serialisation
    assert build_alexnet(seed=2, num_classes=10).SerializeToString(deterministic=True) == fresh
    opset = onnx.ModelProto()
    opset.opset_import.extend(onnx.load_from_string(fresh).opset_import)
    tail = len(opset.SerializeToString())  # the last field: a cut before it still parses
    for cut in (len(fresh) // 3, len(fresh) - tail):  # torn inside a weight; the opset lost
        path.write_bytes(fresh[:cut])
        again = build_alexnet(seed=2, num_classes=10)
        assert again.SerializeToString(deterministic=True) == fresh
        assert path.read_bytes() == fresh


def test_he_scaling(alexnet):
    w = {t.name: numpy_helper.to_array(t) for t in alexnet.graph.initializer
         if t.name in ("conv2.weight", "fc7.weight")}
    assert w["conv2.weight"].std() == pytest.approx(np.sqrt(2 / (64 * 25)), rel=0.02)
    assert w["fc7.weight"].std() == pytest.approx(np.sqrt(2 / 4096), rel=0.02)


def test_presets_and_builtins():
    assert PAPER_PRESET["alexnet"] == ["pool1", "pool2", "pool5"]
    assert BUILTIN["alexnet"] is build_alexnet
