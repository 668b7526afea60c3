"""Built-in models: AlexNet as in the paper, and the trained `digits` CNN.

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

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelError
from ..paths import cache_dir
from .digits import DigitsError
from .digits import build_digits as build
from .filehash import load_hashed
from .graph import BATCH_DIM, INPUT_NAME, OPSET, OUTPUT_NAME


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
    """The trained digits CNN (model/digits.py): from the cache, else trained and cached."""
    try:
        return build(seed)
    except DigitsError as exc:
        raise ModelError(str(exc)) from exc


BUILTIN: dict[str, Callable[..., onnx.ModelProto]] = {"alexnet": build_alexnet,
                                                      "digits": build_digits}

