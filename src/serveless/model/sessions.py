"""onnxruntime sessions, opened the same way wherever a stage is served or measured.

A function serves its stage with `open_stage`: intra-op threads = its vCPUs (rounded up),
one inter-op thread, sequential execution, and threads that sleep instead of spinning
(a spinning thread burns the CPU share that decoding on the other thread needs). The
calibration times blocks through the same function, so what it measures is what a
function runs; one definition keeps the two from drifting.

The driver runs whole models and stages in memory to check a partition (`in_memory_session`):
large weights are handed to onnxruntime as arrays instead of being serialised again, and
`random_feeds` makes the inputs. Both import onnx lazily: a function's cold start, which
is billed, never pays for it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import PartitionError

_SMALL_INIT = 1024
"""Initializers above this many elements are left out of a `skeleton`: shape inference,
the checker and session creation need their names and types, not hundreds of MB of bytes."""


def function_options(threads: int) -> Any:
    """The SessionOptions of a function (and of the calibration that times its blocks)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads burn the CPU share that decoding on the other thread needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def open_stage(path: str, threads: int) -> Any:
    """A stage (or block) file as a function serves it, on the CPU."""
    import onnxruntime as ort

    return ort.InferenceSession(path, function_options(threads),
                                providers=["CPUExecutionProvider"])


def skeleton(model: Any) -> tuple[Any, list[Any]]:
    """The model without its large initializers, and those initializers.

    Serialising hundreds of MB of weights dominates shape inference, the checker and
    session creation; none of them needs the weight bytes, only their names and types.
    """
    import onnx

    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    big = []
    for init in src.initializer:
        if math.prod(init.dims) <= _SMALL_INIT or init.data_type == onnx.TensorProto.STRING:
            g.initializer.append(init)
        else:
            big.append(init)
    return sk, big


def random_feeds(model: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random normal inputs of the model's input shapes, batch dim set to `batch`."""
    from onnx import helper

    g = model.graph
    consts = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in g.input:
        if vi.name in consts:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None for d in dims[1:]):
            raise PartitionError(f"input {vi.name!r} needs static dims after the batch dim "
                                 "to check the stages")
        if dims and dims[0] is not None:  # a fixed batch size (a model that keeps one)
            batch = dims[0]
        shape = [batch, *dims[1:]] if dims else []
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def in_memory_session(model: Any, prepack: bool = True) -> Any:
    """A CPU onnxruntime session; large weights handed over as arrays, not serialised.

    `prepack=False` for a session that runs one small batch: packing the weights for fast
    GEMMs (about 0.2 s for AlexNet's classifier) costs more than it saves; same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    providers = ["CPUExecutionProvider"]
    sk, big = skeleton(model)
    if not big:
        return ort.InferenceSession(model.SerializeToString(), providers=providers)
    arrays = [numpy_helper.to_array(t) for t in big]
    for t in big:  # declared external; the data comes from add_external_initializers
        ref = sk.graph.initializer.add()
        ref.name, ref.data_type = t.name, t.data_type
        ref.dims.extend(t.dims)
        ref.data_location = onnx.TensorProto.EXTERNAL
        ref.external_data.add(key="location", value="serveless-in-memory.bin")
    try:
        so = ort.SessionOptions()
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        so.add_external_initializers([t.name for t in big], values)
        sess = ort.InferenceSession(sk.SerializeToString(), so, providers=providers)
        sess._serveless_keepalive = (arrays, values)  # the session reads these buffers
        return sess
    except Exception:  # an onnxruntime without in-memory initializers: the slow path
        return ort.InferenceSession(model.SerializeToString(), providers=providers)
