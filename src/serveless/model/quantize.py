"""int8 and float16-weight stages, calibrated on the job's own images, with fidelity figures.

`--quantize int8` quantizes every stage statically (QDQ format, per-channel int8 weights,
uint8 activations) with onnxruntime's own tools, each stage calibrated on the fp32 chain's
activations of images drawn from the job's records; the cut tensors stay float32, so the
store, the functions and the resume logic do not change. `--weights float16` stores every
large weight as float16 behind a Cast, which halves what a function downloads and loads;
onnxruntime folds the Cast at session start and computes in float32 (its CPU provider has
no float16 convolutions on x86).

Neither is exact, so a quantized job reports its fidelity against the fp32 whole model on
held-out images of the same records (images the calibration did not see): top-1 agreement,
top-5 overlap and, where the records carry labels, both models' top-1 accuracy.

Quantized stages are cached in the store under `models/<mode>-<hash>/`, the hash covering
the model, the cuts, the calibration images and the settings: a second job on the same
model and images skips calibration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..data.images import preprocess
from ..data.records import Example, count_examples, iter_record
from ..errors import QuantizeError
from ..store.layout import stage_file, stage_key

VERSION = 1  # of the recipe below: part of the cache key
QUANTIZE_MODES = ("int8",)
WEIGHT_TYPES = ("float16",)
DEFAULT_CALIBRATION = 64
DEFAULT_HELDOUT = 256
SEED = 0
# Softmax stays float: a uint8 softmax output has steps of 1/255 and ties the top-5 ranking.
_FLOAT_OPS = {"Softmax", "LogSoftmax"}
_FP16_MIN_ELEMENTS = 1024  # small tensors (biases) stay float32: no size to save there


@dataclass
class Fidelity:
    """A reduced-precision chain against the fp32 whole model, on held-out images."""

    images: int
    top1_agreement: float  # share of images whose top-1 class is the same
    top5_overlap: float  # mean |top-5 ∩ top-5| / 5
    labelled: int = 0
    accuracy_top1_fp32: float | None = None
    accuracy_top1_quantized: float | None = None

    def line(self, mode: str) -> str:
        """One line for the job summary."""
        text = (f"{mode} vs fp32 whole model on {self.images} held-out images: top-1 agreement "
                f"{self.top1_agreement:.2%}, top-5 overlap {self.top5_overlap:.2%}")
        if self.accuracy_top1_fp32 is not None:
            text += (f"; top-1 accuracy {self.accuracy_top1_quantized:.2%} ({mode}) vs "
                     f"{self.accuracy_top1_fp32:.2%} (fp32) on {self.labelled} labelled")
        return text


def check_settings(quantize: str | None, weights: str | None, calibration_images: int) -> None:
    """Refuse unknown modes and mixes up front (a one-line message at the command line)."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise QuantizeError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, "
                            f"got {quantize!r}")
    if weights is not None and weights not in WEIGHT_TYPES:
        raise QuantizeError(f"--weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
    if quantize and weights:
        raise QuantizeError("--quantize int8 already stores int8 weights; "
                            "give --quantize or --weights, not both")
    if calibration_images < 1:
        raise QuantizeError(f"--calibration-images must be >= 1, got {calibration_images}")


def mode_name(quantize: str | None, weights: str | None) -> str | None:
    """'int8', 'fp16-weights' or None (fp32): the label in summaries and cache keys."""
    if quantize:
        return quantize
    if weights == "float16":
        return "fp16-weights"
    return None


# -- choosing images --------------------------------------------------------------------------

Opener = Callable[[], IO[bytes]]


def select_images(records: Sequence[tuple[str, Opener]], calibration: int,
                  heldout: int = DEFAULT_HELDOUT, seed: int = SEED
                  ) -> tuple[list[Example], list[Example]]:
    """Calibration and held-out images drawn from the records, disjoint, deterministic.

    Records packed from class folders hold one class after another, so the draw is a seeded
    shuffle over every image of every record, not the first N. With fewer than
    calibration + 1 images, half (rounded up) calibrate and the rest are held out.
    """
    counts = []
    for name, opener in records:
        with opener() as f:
            counts.append(count_examples(f, name))
    everything = [(r, i) for r, n in enumerate(counts) for i in range(n)]
    total = len(everything)
    if total < 2:
        raise QuantizeError(f"quantization needs at least 2 images in the records, got {total}")
    n_cal = min(calibration, (total + 1) // 2) if total <= calibration else calibration
    order = np.random.default_rng(seed).permutation(total)
    cal = {everything[j] for j in order[:n_cal]}
    held = {everything[j] for j in order[n_cal:n_cal + heldout]}
    out_cal: list[Example] = []
    out_held: list[Example] = []
    for r, (name, opener) in enumerate(records):
        wanted = {i for rr, i in cal | held if rr == r}
        if not wanted:
            continue
        last = max(wanted)
        with opener() as f:
            for i, ex in enumerate(iter_record(f, name)):
                if (r, i) in cal:
                    out_cal.append(ex)
                elif (r, i) in held:
                    out_held.append(ex)
                if i >= last:
                    break
    return out_cal, out_held


def pixels(examples: Sequence[Example], size: Sequence[int],
           resize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage-0 input of the images that decode, and their labels (-1 unknown)."""
    arrays, labels = [], []
    for ex in examples:
        try:
            arrays.append(preprocess(ex.encoded, tuple(size), resize=resize))  # type: ignore
        except ValueError:
            continue  # an image the job would also serve as an error row
        labels.append(ex.label)
    if not arrays:
        return np.zeros((0, 3, *size), np.float32), np.zeros(0, np.int64)
    return np.stack(arrays), np.asarray(labels, np.int64)


# -- the transforms ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns on the root logger about optional pre-processing."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _run_stage(stage: onnx.ModelProto, x: np.ndarray, batch: int = 32) -> np.ndarray:
    from .sessions import in_memory_session

    sess = in_memory_session(stage)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an array, in micro-batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self._it = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # part of the protocol; calibration reads once
        pass


def quantize_stages(stages: Sequence[onnx.ModelProto], calibration: np.ndarray,
                    batch: int = 16) -> list[onnx.ModelProto]:
    """Static int8 QDQ quantization of each stage, calibrated on the fp32 chain.

    Stage k is calibrated on what the fp32 stages 0..k-1 make of `calibration` (stage-0
    input, N×3×H×W): each stage sees the activations it will be fed, and a planner can
    call this on any cuts. Inputs and outputs of every stage stay float32.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if len(calibration) == 0:
        raise QuantizeError("no calibration image could be decoded")
    out = []
    x = calibration
    with tempfile.TemporaryDirectory(prefix="serveless-quantize-") as tmp, _quiet_root_logger():
        for k, stage in enumerate(stages):
            src = os.path.join(tmp, stage_file(k))
            dst = os.path.join(tmp, f"stage-{k}-int8.onnx")
            with open(src, "wb") as f:  # onnx.save_model(external) would modify `stage`
                f.write(stage.SerializeToString())
            name = stage.graph.input[0].name
            keep_float = [n.name for n in stage.graph.node if n.op_type in _FLOAT_OPS]
            quantize_static(
                src, dst, _Batches(name, x, batch), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep_float,
            )
            q = onnx.load(dst)  # external data (if any) read back in
            q.producer_name = "serveless"
            q.doc_string = f"int8 QDQ of stage {k}, calibrated on {len(calibration)} images"
            out.append(q)
            if k < len(stages) - 1:
                x = _run_stage(stage, x)
    return out


def float16_weights(stages: Sequence[onnx.ModelProto]) -> list[onnx.ModelProto]:
    """Each stage with its large float32 weights stored as float16, cast back at load."""
    out = []
    for stage in stages:
        m = onnx.ModelProto()
        m.CopyFrom(stage)
        g = m.graph
        casts = []
        kept = []
        for init in g.initializer:
            n = int(np.prod(init.dims)) if init.dims else 1
            if init.data_type != TensorProto.FLOAT or n < _FP16_MIN_ELEMENTS:
                kept.append(init)
                continue
            half = numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float16), init.name + ".fp16")
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name],
                                          name=init.name + ".cast", to=TensorProto.FLOAT))
        del g.initializer[:]
        g.initializer.extend(kept)
        nodes = casts + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
        m.doc_string = (stage.doc_string + " (float16 weights)").strip()
        out.append(m)
    return out


def _top5(probs: np.ndarray) -> np.ndarray:
    probs = probs.reshape(len(probs), -1)
    return np.argsort(-probs, axis=1, kind="stable")[:, :min(5, probs.shape[1])]


def fidelity(model: onnx.ModelProto, stages: Sequence[onnx.ModelProto], x: np.ndarray,
             labels: np.ndarray | None = None) -> Fidelity:
    """The chained stages against the fp32 whole model on the same stage-0 input."""
    if len(x) == 0:
        raise QuantizeError("no held-out image to measure fidelity on")
    ref = _run_stage(model, x)
    got = x
    for stage in stages:  # also proves the reduced-precision stages chain and run
        got = _run_stage(stage, got)
    t_ref, t_got = _top5(ref), _top5(got)
    overlap = np.mean([len(set(a) & set(b)) / t_ref.shape[1] for a, b in zip(t_ref, t_got,
                                                                                strict=True)])
    f = Fidelity(images=len(x), top1_agreement=float(np.mean(t_ref[:, 0] == t_got[:, 0])),
                 top5_overlap=float(overlap))
    if labels is not None:
        known = labels >= 0
        if known.any():
            f.labelled = int(known.sum())
            f.accuracy_top1_fp32 = float(np.mean(t_ref[known, 0] == labels[known]))
            f.accuracy_top1_quantized = float(np.mean(t_got[known, 0] == labels[known]))
    return f


def reduce_precision(model: onnx.ModelProto, stages: Sequence[onnx.ModelProto],
                     quantize: str | None, weights: str | None, calibration: np.ndarray
                     ) -> list[onnx.ModelProto]:
    """The stages in the asked precision (unchanged for fp32)."""
    if quantize == "int8":
        return quantize_stages(stages, calibration)
    if weights == "float16":
        return float16_weights(stages)
    return list(stages)


# -- in a job: cached in the store ------------------------------------------------------------


def _digest(model: onnx.ModelProto, cuts: Sequence[str], mode: str,
            calibration: Sequence[Example], preprocess_: dict[str, Any], size: Sequence[int],
            model_hash: str | None = None) -> str:
    """`model_hash`: the SHA-256 (hex) of the file the model was read from, when known (see
    filehash.py; for the built-in AlexNet it is its serialisation's), which saves hashing
    a 244 MB serialisation again."""
    import onnxruntime

    h = hashlib.sha256()
    h.update(bytes.fromhex(model_hash) if model_hash else
             hashlib.sha256(model.SerializeToString(deterministic=True)).digest())
    h.update(json.dumps({"cuts": list(cuts), "mode": mode, "recipe": VERSION,
                         "onnxruntime": onnxruntime.__version__, "size": list(size),
                         "preprocess": preprocess_}, sort_keys=True).encode())
    if mode == "int8":  # float16 weights do not depend on images
        for ex in calibration:
            h.update(hashlib.sha256(ex.encoded).digest())
    return h.hexdigest()[:32]


def cache_prefix(mode: str, digest: str) -> str:
    """Store folder of one cached set of reduced-precision stages."""
    return f"models/{mode}-{digest}"


def prepare(store: Any, model: onnx.ModelProto, cuts: Sequence[str],
            stages: Sequence[onnx.ModelProto] | Callable[[], list[onnx.ModelProto]],
            records: Sequence[tuple[str, Opener]],
            quantize: str | None, weights: str | None, size: Sequence[int],
            preprocess_: dict[str, Any] | None = None,
            calibration_images: int = DEFAULT_CALIBRATION,
            heldout_images: int = DEFAULT_HELDOUT, model_hash: str | None = None,
            ) -> tuple[list[onnx.ModelProto], dict[str, Any]]:
    """Reduced-precision stages for a job (from the store's cache when there) and what to
    record in job.json: mode, calibration images, cache key and hit, fidelity. `stages`
    are the fp32 stages, or a function that makes them: then the partition and its
    equivalence check run only when the cache misses."""
    check_settings(quantize, weights, calibration_images)
    mode = mode_name(quantize, weights)
    if mode is None:
        return list(stages() if callable(stages) else stages), {}
    preprocess_ = preprocess_ or {}
    resize = preprocess_.get("resize")
    cal, held = select_images(records, calibration_images, heldout_images)
    digest = _digest(model, cuts, mode, cal, preprocess_, size, model_hash)
    prefix = cache_prefix(mode, digest)
    keys = [stage_key(prefix, k) for k in range(len(cuts) + 1)]
    hit = store is not None and all(store.exists(k) for k in keys)
    if hit:
        out = [onnx.load_from_string(store.get_bytes(k)) for k in keys]
    else:
        x_cal, _ = pixels(cal, size, resize)
        fp32 = stages() if callable(stages) else stages
        out = reduce_precision(model, fp32, quantize, weights, x_cal)
        if store is not None:
            for k, q in zip(keys, out, strict=True):
                store.put_bytes(k, q.SerializeToString())
    held_digest = hashlib.sha256(b"".join(hashlib.sha256(e.encoded).digest()
                                          for e in held)).hexdigest()[:16]
    fkey = f"{prefix}/fidelity-{held_digest}.json"
    fid: Fidelity | None = None
    if store is not None and store.exists(fkey):
        fid = Fidelity(**json.loads(store.get_bytes(fkey)))
    elif held:
        x_held, labels = pixels(held, size, resize)
        if len(x_held):
            fid = fidelity(model, out, x_held, labels)
            if store is not None:
                store.put_bytes(fkey, json.dumps(asdict(fid)).encode())
    info = {"mode": mode, "quantize": quantize, "weights": weights,
            "calibration_images": len(cal) if mode == "int8" else 0,
            "cache": prefix, "cache_hit": hit,
            "fidelity": asdict(fid) if fid is not None else None}
    return out, info


def load_cached(store: Any, info: dict[str, Any] | None,
                stages: int) -> list[onnx.ModelProto] | None:
    """The stages a job was made with (its job.json info), if still in the store's cache."""
    if not info or not info.get("cache"):
        return None
    keys = [stage_key(info["cache"], k) for k in range(stages)]
    if not all(store.exists(k) for k in keys):
        return None
    return [onnx.load_from_string(store.get_bytes(k)) for k in keys]


def summary_lines(info: dict[str, Any] | None) -> list[str]:
    """What a job's summary says about its precision (nothing for fp32 jobs)."""
    if not info or not info.get("mode"):
        return []
    mode = info["mode"]
    head = f"precision: {mode}"
    if info.get("calibration_images"):
        head += f", calibrated on {info['calibration_images']} images of the job's records"
    head += " (cached stages reused)" if info.get("cache_hit") else ""
    lines = [head]
    if info.get("fidelity"):
        lines.append(Fidelity(**info["fidelity"]).line(mode))
    else:
        lines.append(f"{mode}: no held-out image left to measure fidelity on")
    return lines
