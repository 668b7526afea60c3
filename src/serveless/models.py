"""Built-in models (AlexNet as in the paper, the trained `digits` CNN) and loading ONNX files.

The built-in AlexNet is generated, not downloaded: the project must work offline and the
experiments measure memory, time and cost, which depend on the architecture and the size
of the weights, not on their trained values. Weights are deterministic per seed so that
every stage function, on any machine, rebuilds byte-identical weights.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import ModelError

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "N"

PAPER_PRESET: dict[str, list[str]] = {"alexnet": ["pool1", "pool2", "pool5"]}
"""The paper's four AlexNet stages: conv1 block | conv2 block | conv3-5 block | classifier."""
DEMO_CUTS: dict[str, list[str]] = {**PAPER_PRESET, "digits": ["pool1"]}
"""The stages `serveless demo --model M` cuts each built-in model into."""
PREPROCESS_KEY = "serveless.preprocess"
"""ONNX metadata key under which a model declares its stage-0 preprocessing (JSON)."""


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Kaiming-normal weights, so activations keep their scale through ReLU layers."""
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(np.sqrt(2.0 / fan_in))
    return w


ALEXNET_VERSION = 1  # bump when _generate_alexnet changes: it names the cached file


def build_alexnet(seed: int = 0, num_classes: int = 1000) -> onnx.ModelProto:
    """The built-in AlexNet (see `alexnet_hashed`)."""
    return alexnet_hashed(seed, num_classes)[0]


def alexnet_hashed(seed: int = 0, num_classes: int = 1000) -> tuple[onnx.ModelProto, str]:
    """The built-in AlexNet (see `_generate_alexnet`) and the SHA-256 of its deterministic
    serialisation: from the user cache folder, else generated and cached there.

    Generating 61M random weights takes about 1-1.4 s, reading the cached file about 0.3 s;
    every `run` of the built-in model pays this before its first invocation. The file is
    the model's deterministic serialisation, so the cached model is byte-identical to a
    generated one (same content hash, same stage models). A torn or unreadable file is
    generated again and replaced; a cache that cannot be written is skipped. The hash is
    the cached file's (filehash.py: remembered while the file is unchanged), which is the
    serialisation's, so the stage models' address does not depend on where the model came
    from.
    """
    from .filehash import load_hashed
    from .paths import cache_dir

    path = cache_dir() / f"alexnet-v{ALEXNET_VERSION}-seed{seed}-classes{num_classes}.onnx"
    if path.is_file():
        try:
            model, sha = load_hashed(path)
            if _whole_alexnet(model):
                if sha is None:  # the file changed while it was read
                    sha = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
                return model, sha
        except Exception:  # a torn or foreign file: generate again and replace it
            pass
    model = _generate_alexnet(seed, num_classes)
    data = model.SerializeToString(deterministic=True)
    sha = hashlib.sha256(data).hexdigest()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # concurrent first uses each write whole files
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:  # a read-only or full cache folder: the model is still returned
        pass
    return model, sha


def _whole_alexnet(model: onnx.ModelProto) -> bool:
    """A cached file parsed whole. A file cut inside the graph does not parse (the graph is
    one length-delimited field); one cut between the model's top-level fields does, without
    its graph or its opsets (which come after the graph): checked here, with every layer's
    weights (HasField: len(raw_data) would copy 244 MB)."""
    inits = model.graph.initializer
    return bool(model.opset_import) and len(model.graph.node) == 20 and len(inits) == 16 and all(
        t.HasField("raw_data") for t in inits)


def _generate_alexnet(seed: int = 0, num_classes: int = 1000) -> onnx.ModelProto:
    """AlexNet in the torchvision layout (61.1M parameters for 1000 classes), random weights.

    torchvision's AdaptiveAvgPool2d((6, 6)) is omitted: the input is fixed at 224x224, so
    pool5 is already 6x6 and the adaptive pool would be an identity. Dropout is omitted
    too (identity at inference). Every weight row of the classifier is centred (zero sum):
    with random weights the ReLU features are all positive, and non-centred rows would give
    every image the same ranking; centring makes the top-5 depend on the image. With this
    the top-1 probability of a normalised image is about 0.05-0.6, neither flat nor
    saturated, so top-5 comparisons between runs mean something.
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    rng = np.random.default_rng(seed)
    inits: list[tuple[str, np.ndarray]] = []
    nodes: list[onnx.NodeProto] = []

    def param(name: str, arr: np.ndarray) -> str:
        inits.append((name, arr))
        return name

    def conv(name: str, x: str, cin: int, cout: int, k: int, stride: int, pad: int) -> str:
        w = _he_normal(rng, (cout, cin, k, k), cin * k * k)
        b = rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
        nodes.append(helper.make_node(
            "Conv", [x, param(f"{name}.weight", w), param(f"{name}.bias", b)], [name],
            name=name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
        ))
        return name

    def fc(name: str, x: str, fin: int, fout: int) -> str:
        w = _he_normal(rng, (fout, fin), fin)
        w -= w.mean(axis=1, keepdims=True)
        b = rng.standard_normal(fout, dtype=np.float32) * np.float32(0.01)
        nodes.append(helper.make_node(
            "Gemm", [x, param(f"{name}.weight", w), param(f"{name}.bias", b)], [name],
            name=name, transB=1,
        ))
        return name

    def relu(name: str, x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [name], name=name))
        return name

    def pool(name: str, x: str) -> str:
        nodes.append(helper.make_node(
            "MaxPool", [x], [name], name=name, kernel_shape=[3, 3], strides=[2, 2]))
        return name

    t = pool("pool1", relu("relu1", conv("conv1", INPUT_NAME, 3, 64, 11, 4, 2)))
    t = pool("pool2", relu("relu2", conv("conv2", t, 64, 192, 5, 1, 2)))
    t = relu("relu3", conv("conv3", t, 192, 384, 3, 1, 1))
    t = relu("relu4", conv("conv4", t, 384, 256, 3, 1, 1))
    t = pool("pool5", relu("relu5", conv("conv5", t, 256, 256, 3, 1, 1)))
    nodes.append(helper.make_node("Flatten", [t], ["flatten"], name="flatten", axis=1))
    t = relu("relu6", fc("fc6", "flatten", 256 * 6 * 6, 4096))
    t = relu("relu7", fc("fc7", t, 4096, 4096))
    t = fc("fc8", t, 4096, num_classes)
    nodes.append(helper.make_node("Softmax", [t], [OUTPUT_NAME], name="softmax", axis=1))

    graph = helper.make_graph(
        nodes, "alexnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, 3, 224, 224])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, num_classes])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="serveless",
        doc_string=f"AlexNet (torchvision layout), random He-normal weights, seed={seed}",
    )
    # IR 8 is the IR version released with opset 17; every onnxruntime we support loads it.
    model.ir_version = 8
    # Filled in place: make_graph/make_model would copy the 244 MB of weights twice.
    for name, arr in inits:
        t = model.graph.initializer.add()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(arr.shape)
        t.raw_data = arr.astype("<f4", copy=False).tobytes()
    return model


def build_digits(seed: int = 0) -> onnx.ModelProto:
    """The trained digits CNN (serveless.digits): from the cache, else trained and cached."""
    from .digits import DigitsError
    from .digits import build_digits as build

    try:
        return build(seed)
    except DigitsError as exc:
        raise ModelError(str(exc)) from exc


BUILTIN: dict[str, Callable[..., onnx.ModelProto]] = {"alexnet": build_alexnet,
                                                      "digits": build_digits}


def preprocessing(model: onnx.ModelProto) -> dict[str, int]:
    """The stage-0 preprocessing a model declares; {} means the ImageNet transform.

    A model declares it as JSON under the metadata key `serveless.preprocess`; today the
    one setting is `resize`, the shorter side before the centre crop (the ImageNet default
    is 256/224 of the input size; `digits` uses 32, its own input size). Anything else
    there is refused, so a typo does not silently fall back to ImageNet's transform.
    """
    import json

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


def load_model(name_or_path: str) -> onnx.ModelProto:
    """A built-in model by name, or an ONNX file by path, checked to be an image model."""
    return load_model_hashed(name_or_path)[0]


def load_model_hashed(name_or_path: str) -> tuple[onnx.ModelProto, str | None]:
    """`load_model`, and the SHA-256 of the bytes it was read from (a file and its external
    data, see filehash.py), so that the stage store need not serialise 244 MB to hash the
    model; None where there is no such file (then hash the model itself)."""
    from .filehash import load_hashed

    key = str(name_or_path)
    if key.lower() == "alexnet":
        return alexnet_hashed()
    if key.lower() in BUILTIN:
        return BUILTIN[key.lower()](), None
    path = Path(key)
    if not path.exists():
        raise ModelError(f"model file not found: {path} "
                         f"(built-in models: {', '.join(sorted(BUILTIN))})")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        model, sha = load_hashed(path)
    except Exception as e:  # protobuf DecodeError, bad external data, ...
        raise ModelError(f"cannot read ONNX model {path}: {e}") from e
    if not model.graph.node:
        raise ModelError(f"{path} is not an ONNX model (its graph has no nodes)")
    check_image_model(model)
    return model, sha


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
        from .partition import _random_feeds, _session

        sess = _session(dynamic)
        feeds = _random_feeds(dynamic, fixed + 1, seed=0)
        outs = sess.run(None, feeds)
        if any(o.ndim == 0 or o.shape[0] != fixed + 1 for o in outs):
            return model, fixed
    except Exception:  # onnxruntime refuses the graph or its run: keep the fixed batch
        return model, fixed
    return dynamic, None
