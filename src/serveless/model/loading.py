"""Loading a model by name (a built-in) or by path (an ONNX file), checked to be an image
model we can serve, with the SHA-256 of the bytes it came from where there is a file."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import ModelError
from .builtins import BUILTIN, alexnet_hashed
from .filehash import load_hashed
from .graph import check_image_model


def load_model(name_or_path: str) -> onnx.ModelProto:
    """A built-in model by name, or an ONNX file by path, checked to be an image model."""
    return load_model_hashed(name_or_path)[0]


def load_model_hashed(name_or_path: str) -> tuple[onnx.ModelProto, str | None]:
    """`load_model`, and the SHA-256 of the bytes it was read from (a file and its external
    data, see filehash.py), so that the stage store need not serialise 244 MB to hash the
    model; None where there is no such file (then hash the model itself)."""
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


