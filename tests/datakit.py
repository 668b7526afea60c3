"""Small inputs for the data-in/data-out tests: tiny ONNX models built with onnx.helper (no
downloads) and small images in every accepted format."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

SIZE = 16  # the tiny models' input H = W
CLASSES = 10


def tiny_classifier(batch: int | str = "N", softmax: bool = True, reshape_to_batch: bool = False,
                    seed: int = 3) -> onnx.ModelProto:
    """conv → relu → global pool → flatten → matmul (+ softmax) on N×3×16×16.

    `batch` fixes the batch dim (as a common PyTorch export does with batch 1);
    `reshape_to_batch` flattens with a Reshape to the constant [batch, -1], which no
    symbolic batch can replace (the graph does not allow a dynamic batch).
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, CLASSES)).astype(np.float32) * 3,
                                     "w2")]
    nodes = [helper.make_node("Conv", ["img", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"])]
    if reshape_to_batch:
        inits.append(numpy_helper.from_array(np.array([batch, -1], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["g", "shape"], ["f"]))
    else:
        nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    out = "p" if softmax else "logits"
    nodes.append(helper.make_node("MatMul", ["f", "w2"], ["logits"]))
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["p"], axis=1))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, str(path))
    return str(path)


def picture(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A small smooth RGB picture (smooth so lossy formats stay close to the original)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def image_folder(root: Path, per_class: int = 4, classes: tuple[str, ...] = ("cat", "dog"),
                 fmt: str = "JPEG", ext: str = ".jpg", seed: int = 0) -> list[str]:
    """ImageFolder layout: root/<class>/img_<i><ext>; returns the relative names."""
    names = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{name}/img_{i}{ext}"
            (root / rel).write_bytes(encode(picture(seed + 100 * c + i), fmt))
            names.append(rel)
    return names


def png_bytes(color: tuple[int, int, int] = (200, 10, 10), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def gray_jpeg_bytes(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), 77).save(buf, "JPEG")
    return buf.getvalue()
