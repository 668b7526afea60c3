"""What a model declares, checked before anything runs: one N×3×H×W image input, one output,
its preprocessing, whether its output is a distribution, its batch size.

Stage 0 decodes images into exactly the model's input tensor, so a model that takes
anything else would fail late, inside a function, on every record; it is refused here with
a message naming what is wrong. Models exported with a fixed batch size are made to take
any batch where they can (`make_batch_dynamic`).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import ModelError
from .sessions import in_memory_session, random_feeds

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "N"
"""The names the built-in models give their input, output and batch dimension."""
PREPROCESS_KEY = "serveless.preprocess"
"""ONNX metadata key under which a model declares its stage-0 preprocessing (JSON)."""


def preprocessing(model: onnx.ModelProto) -> dict[str, int]:
    """The stage-0 preprocessing a model declares; {} means the ImageNet transform.

    A model declares it as JSON under the metadata key `serveless.preprocess`; today the
    one setting is `resize`, the shorter side before the centre crop (the ImageNet default
    is 256/224 of the input size; `digits` uses 32, its own input size). Anything else
    there is refused, so a typo does not silently fall back to ImageNet's transform.
    """
    props = {p.key: p.value for p in model.metadata_props}
    if PREPROCESS_KEY not in props:
        return {}
    try:
        value = json.loads(props[PREPROCESS_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(f"metadata {PREPROCESS_KEY!r} is not JSON: {exc}") from exc
    if not isinstance(value, dict) or set(value) - {"resize"}:
        raise ModelError(f"metadata {PREPROCESS_KEY!r} must be like {{\"resize\": 32}}, "
                         f"got {props[PREPROCESS_KEY]!r}")
    resize = value.get("resize")
    if resize is None:
        return {}
    if not isinstance(resize, int) or isinstance(resize, bool) or resize < 1:
        raise ModelError(f"metadata {PREPROCESS_KEY!r}: resize must be an integer >= 1")
    return {"resize": resize}


def _describe_type(vi: onnx.ValueInfoProto) -> tuple[str, list[int | str]]:
    """(element type name, dims) of a value, '?' for unknown dims, for error messages."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return "non-tensor", []
    elem = TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "unknown"
    if not tt.HasField("shape"):
        return elem, []
    dims: list[int | str] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append("?")
    return elem, dims


def check_image_model(model: onnx.ModelProto) -> tuple[str, tuple[int, int, int]]:
    """Check the model takes one N×3×H×W float32 image batch and has one output.

    Stage 0 decodes images into exactly that tensor, so anything else would fail late,
    inside a function; we refuse it up front with a message naming what is wrong.
    Returns (input name, (C, H, W)).
    """
    g = model.graph
    init_names = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    inputs = [vi for vi in g.input if vi.name not in init_names]
    if len(inputs) != 1:
        names = ", ".join(repr(vi.name) for vi in inputs) or "none"
        raise ModelError(f"model must have exactly one input (an N×3×H×W float32 image batch), "
                         f"got {len(inputs)}: {names}")
    if len(g.output) != 1:
        names = ", ".join(repr(vi.name) for vi in g.output) or "none"
        raise ModelError(f"model must have exactly one output, got {len(g.output)}: {names}")
    vi = inputs[0]
    elem, dims = _describe_type(vi)
    ok = (
        elem == "float"
        and len(dims) == 4
        and dims[1] == 3
        and all(isinstance(d, int) and d > 0 for d in dims[2:])
    )
    if not ok:
        shown = "float32" if elem == "float" else elem
        raise ModelError(f"model input {vi.name!r} must be N×3×H×W float32 with static H and W, "
                         f"got {shown} {dims}")
    c, h, w = dims[1], dims[2], dims[3]
    return vi.name, (int(c), int(h), int(w))


def input_hw(model: onnx.ModelProto) -> tuple[int, int]:
    """(H, W) the images must be resized to before stage 0."""
    _, (_, h, w) = check_image_model(model)
    return h, w


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write a model as a single .onnx file (our stages are far below protobuf's 2 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# -- models as users export them ---------------------------------------------------------------

#: Ops that pass a distribution through unchanged in value (only its shape or type).
_SHAPE_ONLY = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}


def output_is_distribution(model: onnx.ModelProto) -> bool:
    """Whether the output comes from a Softmax (through shape-only ops): probabilities.

    Anything else (a Gemm's logits, a LogSoftmax) is not a distribution; top-k scores of
    such a model are softmax(outputs) under --softmax auto.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    name = model.graph.output[0].name
    for _ in range(len(model.graph.node) + 1):
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "Softmax":
            return True
        if node.op_type not in _SHAPE_ONLY or not node.input:
            return False
        name = node.input[0]
    return False


def batch_size_of(model: onnx.ModelProto) -> int | None:
    """The input's fixed batch size, or None when the batch dimension is symbolic."""
    _, dims = _describe_type(_real_input(model))
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


def _real_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    g = model.graph
    consts = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    return next(vi for vi in g.input if vi.name not in consts)


def make_batch_dynamic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int | None]:
    """A model exported with a fixed batch size (often 1), made to take any batch if it can.

    The input's and outputs' first dims become the symbolic 'N' and stale inferred shapes
    are dropped; the result must then run on a batch of fixed+1 and answer fixed+1 rows
    (a Reshape to a constant [1, -1] does not, for one). Returns (model, None) when that
    works, else (the model unchanged, its fixed batch size): it is then served in
    micro-batches of exactly that size.
    """
    fixed = batch_size_of(model)
    if fixed is None:
        return model, None
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    g = dynamic.graph
    del g.value_info[:]
    for vi in [_real_input(dynamic), *g.output]:
        shape = vi.type.tensor_type.shape
        if shape.dim:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = BATCH_DIM
    try:
        sess = in_memory_session(dynamic)
        feeds = random_feeds(dynamic, fixed + 1, seed=0)
        outs = sess.run(None, feeds)
        if any(o.ndim == 0 or o.shape[0] != fixed + 1 for o in outs):
            return model, fixed
    except Exception:  # onnxruntime refuses the graph or its run: keep the fixed batch
        return model, fixed
    return dynamic, None
