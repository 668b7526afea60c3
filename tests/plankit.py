"""Small inputs for the planning tests: a synthetic calibration (a made-up 4-block model with
every measured path) and a tiny residual ONNX model to calibrate, plan and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serveless.planning.calibrate import CALIBRATION_KIND


def synthetic_calibration(blocks: int = 4) -> dict:
    """A made-up 4-block model: heavy early blocks with big outputs, a heavy classifier."""
    ms = [12.0, 6.0, 4.0, 2.0][:blocks]
    weights = [5.0, 20.0, 40.0, 250.0][:blocks]
    out = [600_000, 150_000, 40_000, 260][:blocks]
    return {
        "kind": CALIBRATION_KIND, "version": 1, "model": "synthetic", "input_hw": [224, 224],
        "boundaries": [f"b{k}" for k in range(blocks - 1)],
        "blocks": [{"index": k, "end": f"b{k}", "ms_per_image_b1": ms[k] * 1.5,
                    "ms_per_image": ms[k], "speedup_2vcpu": 1.2 + 0.2 * k,
                    "weights_mb": weights[k], "act_mb_base": 2.0, "act_mb_per_image": 1.5,
                    "bytes_out_per_image": out[k], "load_ms": weights[k],
                    "model_bytes": int(weights[k] * 2**20), "load_peak_mb": weights[k] * 1.2,
                    "first_run_ms": 3.0 + k}
                   for k in range(blocks)],
        "input_bytes_per_image": 100_000, "decode_ms_per_image": 5.0, "runtime_mb": 70.0,
        "start_ms": 300.0, "load_ms_fixed": 5.0, "load_ms_per_mb": 1.0,
        "store": {"read_mb_s": 500.0, "write_mb_s": 500.0, "request_ms": 1.0},
        "calibration_batch": 16, "stage0_first_call_ms": 40.0, "record_ms_per_image": 0.3,
        "write_ms_per_mb": 2.0, "read_ms_per_mb": 0.5, "predictions_ms_per_image": 0.1,
    }


def tiny_residual_model(path: Path) -> Path:
    """Conv -> ReLU -> [Conv + skip] -> ReLU -> GAP -> Gemm -> Softmax, 3×32×32 input."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv2", "relu1"], ["add"]),
        helper.make_node("Relu", ["add"], ["relu2"]),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny-residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3), init("b2", 8),
         init("w3", 10, 8), init("b3", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path
