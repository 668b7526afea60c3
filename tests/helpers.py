"""Checks shared by the end-to-end tests: prediction rows, the whole-model reference, a job's
objects in a bucket, and small record sets and models to run jobs on."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from serveless.data.images import preprocess
from serveless.data.predictions import read_predictions
from serveless.data.records import read_record
from serveless.data.samples import make_sample_images
from serveless.data.sources import pack
from serveless.store import Store


def run_cli(*args: str, **kw: Any) -> subprocess.Popen:
    """`python -m serveless.cli ARGS` in a process of its own, as a user runs it (pipes)."""
    return subprocess.Popen([sys.executable, "-m", "serveless.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def snapshot(root: Path) -> dict[str, int]:
    """Every path under root with its size: compare before and after to see what changed."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")} \
        if root.exists() else {}


def rows_of(store: Store, job: str) -> list[dict[str, Any]]:
    """Every prediction row of a job, from the store."""
    return read_predictions(store, job)


def assert_one_row_per_image(rows: list[dict[str, Any]], expected: int) -> None:
    counts = Counter((r["record"], r["index"]) for r in rows)
    assert len(counts) == expected, f"{len(counts)} distinct rows for {expected} images"
    assert max(counts.values()) == 1, "duplicated rows"


def whole_model_probs(model: Any, records_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    """The reference: the whole model in one onnxruntime session, record by record, on its
    own input (name and H×W from the graph, as stage 0 decodes to)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (feed,) = sess.get_inputs()
    hw = tuple(feed.shape[2:])
    out = {}
    for path in sorted(records_dir.glob("*.tfrecord")):
        examples = read_record(path.read_bytes())
        batch = np.stack([preprocess(ex.encoded, hw) for ex in examples])
        (probs,) = sess.run(None, {feed.name: batch})
        for i, p in enumerate(probs):
            out[(path.stem, i)] = p
    return out


def check_predictions(store: Store, job: str, records_dir: Path, model: Any, images: int) -> None:
    """One row per image, each equal to the whole model's top-5 within 1e-4."""
    rows = rows_of(store, job)
    keys = [(r["record"], r["index"]) for r in rows]
    assert len(keys) == images and len(set(keys)) == images
    expected = whole_model_probs(model, records_dir)
    assert set(expected) == set(keys)
    for r in rows:
        probs = expected[(r["record"], r["index"])]
        assert r["error"] is None and r["label"] in (0, 1, 2)
        assert r["filename"].endswith(".jpg")
        np.testing.assert_allclose(np.array(r["probs"]), probs[r["top5"]], atol=1e-4)
        np.testing.assert_allclose(np.array(r["probs"]), np.sort(probs)[::-1][:5], atol=1e-4)


def check_layout_in_bucket(keys: list[str], prefix: str, job: str, records: list[str],
                           stages: int, models: str) -> None:
    """Everything of the job is in the bucket, as DESIGN.md lays it out; nothing else."""
    names = {k.removeprefix(f"{prefix}/{job}/") for k in keys}
    assert "job.json" in names and any(re.fullmatch(r"log/[^/]+\.jsonl", n) for n in names)
    assert models.startswith("models/") and f"{prefix}/{models}/manifest.json" in keys
    for k in range(stages):  # shared by the jobs of the same model and cuts in this store
        assert f"{prefix}/{models}/stage-{k}.onnx" in keys
    for rec in records:
        assert f"records/{rec}.tfrecord" in names and f"predictions/{rec}.jsonl" in names
        assert f"stage-0/{rec}.meta.json" in names
        for k in range(stages - 1):
            assert f"stage-{k}/{rec}.npy" in names
    assert not [k for k in keys if ".tmp-" in k or ".serveless-check-" in k]


def small_records(root: Path, seed: int, images: int = 20, per_record: int = 10) -> Path:
    """`images` sample photos of 3 classes in records of `per_record`, under root/records:
    a job of a few calls (Lithops localhost starts a process per call)."""
    make_sample_images(root / "images", images, classes=3, seed=seed)
    pack(root / "images", Store(str(root / "records")), "", per_record)
    return root / "records"


def tiny_classifier(classes: int = 10, seed: int = 0) -> Any:
    """N×3×32×32 → mean colour → `classes` probabilities: a whole job in a second or two.
    Its tensors 'pooled', 'flat' and 'logits' are valid cuts."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(3, classes)).astype(np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tiny_conv_classifier(h: int = 32, w: int = 32, channels: int = 16) -> Any:
    """Conv, relu, global pool, linear, softmax on N×3×h×w: a user model that runs anywhere.

    Cut at "r1" it makes two stages; its conv weights (channels×27 floats) are above the
    1 KB threshold, so stage 0 stores them as external data like a real model's.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((channels, 7)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Conv", ["img", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["p"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, h, w])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 7])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@contextlib.contextmanager
def no_hang(seconds: float = 5.0):
    """Fail instead of hanging: a reader that stops advancing is a bug."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"reader still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def tables(md: str) -> list[list[dict[str, str]]]:
    """Every pipe table of a markdown text as a list of {header: cell} rows."""
    out, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[ :|-]+\|$",
                                                                        lines[i + 1]):
            head = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, [c.strip() for c in lines[i].strip("|").split("|")],
                                     strict=True)))
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def check_png(path: Path) -> None:
    assert path.stat().st_size > 10_000, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 400 and img.height >= 300, img.size


def write_recorded_job(store: Store, job: str) -> list[dict]:
    """The recorded job (see recorded_job) written into `store` as `job`; its log rows."""
    import json

    from serveless.data.predictions import prediction_row
    from serveless.driver.spec import JobSpec

    text = (Path(__file__).resolve().parent / "data" / "replay-invocations.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    records = sorted({r["record"] for r in rows})
    JobSpec(job=job, model="alexnet", cuts=["pool5"], memory=[1769, 1769],
            micro_batch=25, records=records, concurrency=1).save(store)
    store.put_bytes(f"{job}/invocations.jsonl", text.encode())
    rng = np.random.default_rng(5)
    for rec in records:
        lines = []
        for i in range(25):
            probs = rng.dirichlet(np.ones(1000))
            top = np.argsort(-probs, kind="stable")[:5]
            lines.append(json.dumps(prediction_row(rec, i, f"{rec}/{i}.jpg", i % 3, top,
                                                   probs[top], None)))
        store.put_bytes(f"{job}/predictions/{rec}.jsonl", ("\n".join(lines) + "\n").encode())
    return rows


def run_local(store: Store, spec: Any, image_errors: int = 0) -> None:
    """Run a prepared job on a fresh local backend (concurrency 2, no progress bar); no
    record may fail, and exactly `image_errors` images may (error rows)."""
    from serveless.backends.local import LocalBackend
    from serveless.driver.scheduler import run_job

    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    assert not result.failed_records, result.failed_records
    assert result.image_errors == image_errors, result.image_errors

