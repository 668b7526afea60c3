"""The built-in `digits` model: a small CNN trained here, so that accuracy means something.

AlexNet's weights are random, so its predictions say nothing about quality, and int8
fidelity can only be compared to fp32. `digits` is trained, at first use, on
scikit-learn's bundled handwritten digits (1,797 images of 8×8, no download), each
upsampled to 32×32 RGB and JPEG-encoded, then decoded by stage 0's own `preprocess`: the
network learns on exactly the pixels a job feeds it. Training is plain numpy (im2col
convolutions, Adam), deterministic for a seed, a few seconds on 2 cores. The result is
cached as ONNX (never pickle) in the user cache folder.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..paths import cache_dir

VERSION = 1  # bump when the data, architecture or training change: the cache key
SIZE = 32
CLASSES = 10
HELDOUT_SHARE = 0.25
PREPROCESS = {"resize": SIZE}  # shorter side to 32, centre crop 32: no ImageNet 256 step


class DigitsError(RuntimeError):
    """The digits data set cannot be loaded (scikit-learn missing) or training failed."""


@dataclass
class DigitsData:
    """JPEG bytes of every image, their labels, and the deterministic held-out split."""

    jpegs: list[bytes]
    labels: np.ndarray
    train: np.ndarray  # indices
    heldout: np.ndarray  # indices


def _render(img8: np.ndarray) -> bytes:
    """An 8×8 digit (0..16) as a 32×32 RGB JPEG, white ink on black as in the data set."""
    from PIL import Image

    gray = Image.fromarray(np.round(img8 * (255 / 16)).astype(np.uint8), "L")
    rgb = gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@functools.cache
def load_data(seed: int = 0) -> DigitsData:
    """The whole set as JPEGs, and a stratified held-out split (25%) drawn from `seed`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DigitsError("the digits model needs scikit-learn: pip install "
                          "'serveless[digits]' (or scikit-learn)") from exc
    d = load_digits()
    labels = np.asarray(d.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in range(CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        held.extend(idx[: round(len(idx) * HELDOUT_SHARE)].tolist())
    heldout = np.array(sorted(held))
    rng.shuffle(heldout)  # classes mixed, so any prefix is a fair sample
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return DigitsData([_render(im) for im in d.images], labels, train, heldout)


def _pixels(jpegs: list[bytes]) -> np.ndarray:
    """NCHW float32 exactly as stage 0 makes them."""
    from ..data.images import preprocess

    return np.stack([preprocess(b, SIZE, resize=PREPROCESS["resize"]) for b in jpegs])


# -- the network, in numpy (NHWC inside, exported as NCHW ONNX) ------------------------------

# (in, out, kernel, stride, pad) per conv; each is followed by ReLU and a 2×2 max pool.
# The first conv reads non-overlapping 2×2 patches: the digits are 8×8 upsampled, so the
# 32×32 input carries no detail finer than that, and it makes training 5× cheaper.
_ARCH = ((3, 32, 2, 2, 0), (32, 64, 3, 1, 1))


def _im2col(x: np.ndarray, k: int, s: int, pad: int) -> np.ndarray:
    """(B, H, W, C) -> (B*Ho*Wo, C*k*k) patches, in the (C, kh, kw) order of OIHW weights."""
    b, _, _, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::s, ::s]
    return win.reshape(-1, c * k * k)


def _col2im(cols: np.ndarray, shape: tuple[int, int, int, int], k: int, s: int,
            pad: int) -> np.ndarray:
    b, h, w, c = shape
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    g = cols.reshape(b, ho, wo, c, k, k)
    out = np.zeros((b, h + 2 * pad, w + 2 * pad, c), cols.dtype)
    for i in range(k):
        for j in range(k):
            out[:, i:i + s * ho:s, j:j + s * wo:s, :] += g[..., i, j]
    return out[:, pad:pad + h, pad:pad + w, :]


def _out_side(side: int) -> int:
    for _, _, k, s, pad in _ARCH:
        side = ((side + 2 * pad - k) // s + 1) // 2
    return side


def _init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {}
    for n, (cin, cout, k, _, _) in enumerate(_ARCH, 1):
        fan = cin * k * k
        p[f"w{n}"] = (rng.standard_normal((fan, cout)) * np.sqrt(2 / fan)).astype(np.float32)
        p[f"b{n}"] = np.zeros(cout, np.float32)
    feat = _out_side(SIZE) ** 2 * _ARCH[-1][1]
    p["wf"] = (rng.standard_normal((feat, CLASSES)) * np.sqrt(1 / feat)).astype(np.float32)
    p["bf"] = np.zeros(CLASSES, np.float32)
    return p


def _forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list]:
    """Logits of NHWC input, and what backward needs."""
    cache = []
    for n, (_, _, k, s, pad) in enumerate(_ARCH, 1):
        b, h, w, _ = x.shape
        ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        cols = _im2col(x, k, s, pad)
        z = (cols @ p[f"w{n}"] + p[f"b{n}"]).reshape(b, ho, wo, -1)
        r = np.maximum(z, 0)
        pooled = r.reshape(b, ho // 2, 2, wo // 2, 2, -1).max(axis=(2, 4))
        cache.append((x.shape, cols, z, r, pooled))
        x = pooled
    flat = x.reshape(len(x), -1)
    cache.append(flat)
    return flat @ p["wf"] + p["bf"], cache


def _backward(p: dict[str, np.ndarray], cache: list, dlogits: np.ndarray) -> dict:
    g: dict[str, np.ndarray] = {}
    flat = cache[-1]
    g["wf"] = flat.T @ dlogits
    g["bf"] = dlogits.sum(0)
    d = dlogits @ p["wf"].T
    for n in range(len(_ARCH), 0, -1):
        _, _, k, s, pad = _ARCH[n - 1]
        xshape, cols, z, r, pooled = cache[n - 1]
        b, ho, wo, _ = r.shape
        d = d.reshape(pooled.shape)
        mask = r.reshape(b, ho // 2, 2, wo // 2, 2, -1) == pooled[:, :, None, :, None, :]
        dr = (mask * d[:, :, None, :, None, :]).reshape(r.shape)
        dz = (dr * (z > 0)).reshape(b * ho * wo, -1)
        g[f"w{n}"] = cols.T @ dz
        g[f"b{n}"] = dz.sum(0)
        if n > 1:
            d = _col2im(dz @ p[f"w{n}"].T, xshape, k, s, pad)
    return g


def _logits(p: dict[str, np.ndarray], x_nchw: np.ndarray, batch: int = 256) -> np.ndarray:
    x = x_nchw.transpose(0, 2, 3, 1)
    return np.concatenate([_forward(p, x[i:i + batch])[0] for i in range(0, len(x), batch)])


def train(seed: int = 0, epochs: int = 12, batch: int = 32, lr: float = 2e-3,
          data: DigitsData | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Train from `seed` on the training split; (parameters, held-out top-1 in numpy).

    BLAS runs on one thread: these matrices are small, so more threads only wait on each
    other (on a busy 2-core machine, 3× slower), and one thread gives the same sums in the
    same order on every run.
    """
    with _one_blas_thread():
        return _train(seed, epochs, batch, lr, data or load_data(seed))


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # comes with scikit-learn; without it, BLAS keeps its threads
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _train(seed: int, epochs: int, batch: int, lr: float,
           data: DigitsData) -> tuple[dict[str, np.ndarray], float]:
    x_all = _pixels(data.jpegs).transpose(0, 2, 3, 1).copy()  # NHWC
    x, y = x_all[data.train], data.labels[data.train]
    rng = np.random.default_rng(seed)
    p = _init(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps, t = 0.9, 0.999, 1e-8, 0
    steps = epochs * -(-len(x) // batch)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            logits, cache = _forward(p, x[idx])
            logits -= logits.max(1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(1, keepdims=True)
            prob[np.arange(len(idx)), y[idx]] -= 1
            grads = _backward(p, cache, prob / len(idx))
            t += 1
            rate = lr * 0.5 * (1 + np.cos(np.pi * t / steps))  # cosine decay to 0
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * grads[k]
                v2[k] = b2 * v2[k] + (1 - b2) * grads[k] ** 2
                mh = m[k] / (1 - b1**t)
                vh = v2[k] / (1 - b2**t)
                p[k] -= (rate * mh / (np.sqrt(vh) + eps)).astype(np.float32)
    xh = x_all[data.heldout].transpose(0, 3, 1, 2)
    acc = float((_logits(p, xh).argmax(1) == data.labels[data.heldout]).mean())
    return p, acc


def to_onnx(p: dict[str, np.ndarray], seed: int, heldout_top1: float) -> onnx.ModelProto:
    """The trained network as an NCHW ONNX classifier that declares its preprocessing."""
    from .graph import BATCH_DIM, INPUT_NAME, OPSET, OUTPUT_NAME, PREPROCESS_KEY

    inits, nodes = [], []
    x = INPUT_NAME
    for k, (cin, cout, ks, st, pad) in enumerate(_ARCH, 1):
        w = p[f"w{k}"].T.reshape(cout, cin, ks, ks)  # (C*k*k, O), (C, kh, kw) order -> OIHW
        inits += [helper.make_tensor(f"conv{k}.weight", TensorProto.FLOAT, w.shape,
                                     w.astype("<f4").tobytes(), raw=True),
                  helper.make_tensor(f"conv{k}.bias", TensorProto.FLOAT, [cout],
                                     p[f"b{k}"].astype("<f4").tobytes(), raw=True)]
        nodes += [
            helper.make_node("Conv", [x, f"conv{k}.weight", f"conv{k}.bias"], [f"conv{k}"],
                             name=f"conv{k}", kernel_shape=[ks, ks], strides=[st, st],
                             pads=[pad] * 4),
            helper.make_node("Relu", [f"conv{k}"], [f"relu{k}"], name=f"relu{k}"),
            helper.make_node("MaxPool", [f"relu{k}"], [f"pool{k}"], name=f"pool{k}",
                             kernel_shape=[2, 2], strides=[2, 2]),
        ]
        x = f"pool{k}"
    side, ch = _out_side(SIZE), _ARCH[-1][1]
    # numpy flattens NHWC as (H, W, C); ONNX Flatten of NCHW gives (C, H, W)
    wf = p["wf"].reshape(side, side, ch, CLASSES).transpose(2, 0, 1, 3).reshape(-1, CLASSES)
    inits += [helper.make_tensor("fc.weight", TensorProto.FLOAT, [CLASSES, wf.shape[0]],
                                 np.ascontiguousarray(wf.T).astype("<f4").tobytes(), raw=True),
              helper.make_tensor("fc.bias", TensorProto.FLOAT, [CLASSES],
                                 p["bf"].astype("<f4").tobytes(), raw=True)]
    nodes += [
        helper.make_node("Flatten", [x], ["flatten"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten", "fc.weight", "fc.bias"], ["fc"], name="fc",
                         transB=1),
        helper.make_node("Softmax", ["fc"], [OUTPUT_NAME], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="serveless",
        doc_string=(f"digits CNN v{VERSION}, trained in numpy on scikit-learn's digits, "
                    f"seed={seed}, held-out top-1 {heldout_top1:.4f}"),
    )
    model.ir_version = 8
    helper.set_model_props(model, {PREPROCESS_KEY: json.dumps(PREPROCESS),
                                   "serveless.heldout_top1": f"{heldout_top1:.6f}"})
    return model


def build_digits(seed: int = 0) -> onnx.ModelProto:
    """The trained digits model: from the cache, else trained now and cached (atomically)."""
    path = cache_dir() / f"digits-v{VERSION}-seed{seed}.onnx"
    if path.is_file():
        try:
            model = onnx.load(str(path))
            if model.graph.node:
                return model
        except Exception:  # a torn or foreign file: train again and replace it
            pass
    p, acc = train(seed)
    model = to_onnx(p, seed, acc)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)  # concurrent first uses each write whole files; last one wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model


def heldout_examples(seed: int = 0, limit: int | None = None) -> list[tuple[bytes, int]]:
    """(JPEG bytes, label) of the held-out split, classes mixed, the first `limit` of them."""
    data = load_data(seed)
    idx = data.heldout if limit is None else data.heldout[:limit]
    return [(data.jpegs[i], int(data.labels[i])) for i in idx]
