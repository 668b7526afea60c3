"""Models as users export them (issue 11, item 4): a user's .onnx file runs where a model is
named, at its own input size; a fixed batch size is made dynamic or served in micro-batches
of that size, logits are turned into probabilities for top-k (and said so), and the
preprocessing chosen is recorded in job.json and printed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from datakit import SIZE, image_folder, save, tiny_classifier
from helpers import assert_one_row_per_image, rows_of, tiny_conv_classifier
from typer.testing import CliRunner

from serveless.backends.local import LocalBackend
from serveless.cli import app
from serveless.data.images import make_transform, preprocess
from serveless.data.records import read_record
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.errors import JobError
from serveless.model.builtins import build_alexnet
from serveless.model.graph import make_batch_dynamic, output_is_distribution, save_model
from serveless.store import Store

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    image_folder(root, per_class=5, classes=("a", "b"))  # 10 images: records of 6 and 4
    return root


def run(tmp_path: Path, model: onnx.ModelProto, photos: Path, **kw):
    """Run a one-stage (or `cuts`) job on the photos; returns (rows by filename, spec, store)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = save(model, tmp_path / "model.onnx")
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "j", path, records=str(photos), per_record=6, **kw)
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    assert result.ok, result.failed_records
    rows = {r["filename"]: r for r in rows_of(store, "j")}
    assert len(rows) == 10
    return rows, spec, store


def reference(model: onnx.ModelProto, store: Store, transform: dict | None = None) -> dict:
    """The user's model as exported, one image at a time (its fixed batch of 1 or n)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = sess.get_inputs()[0].shape[0]
    batch = batch if isinstance(batch, int) else 1
    tf = transform or {}
    out = {}
    for key in store.list("j/records", ".tfrecord"):
        for ex in read_record(store.get_bytes(key)):
            x = preprocess(ex.encoded, SIZE, tf.get("resize"), mean=tf.get("mean"),
                           std=tf.get("std"))
            feed = np.zeros((batch, 3, SIZE, SIZE), np.float32)
            feed[0] = x
            out[ex.filename] = sess.run(None, {"img": feed})[0][0]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def check_top5(rows: dict, expected: dict, key: str = "probs") -> None:
    for name, r in rows.items():
        want = expected[name]
        assert r["top5"] == [int(i) for i in np.argsort(-want, kind="stable")[:5]], name
        np.testing.assert_allclose(r[key], want[r["top5"]], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_fixed_batch_of_one_is_made_dynamic(tmp_path, photos):
    model = tiny_classifier(batch=1)
    dynamic, fixed = make_batch_dynamic(model)
    assert fixed is None
    assert dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    rows, spec, store = run(tmp_path, model, photos)
    assert spec.fixed_batch is None
    check_top5(rows, reference(model, store))
    assert all(r["scores"] == "probs" for r in rows.values())


@pytest.mark.e2e
def test_fixed_batch_the_graph_keeps_is_served_in_micro_batches_of_that_size(tmp_path, photos):
    model = tiny_classifier(batch=4, reshape_to_batch=True)  # Reshape to the constant [4, -1]
    assert make_batch_dynamic(model) == (model, 4)
    rows, spec, store = run(tmp_path, model, photos, cuts="r1")  # two stages, each fixed at 4
    assert spec.fixed_batch == 4 and spec.stages == 2
    check_top5(rows, reference(model, store))  # records of 6 and 4: chunks of 4, zero-padded


@pytest.mark.e2e
def test_a_logits_model_gets_softmax_for_top5_and_rows_say_so(tmp_path, photos):
    model = tiny_classifier(softmax=False)
    assert not output_is_distribution(model)
    assert output_is_distribution(tiny_classifier())
    rows, spec, store = run(tmp_path / "auto", model, photos)
    assert spec.scores == "softmax(logits)"
    logits = reference(model, store)
    check_top5(rows, {k: softmax(v) for k, v in logits.items()})
    assert all(r["scores"] == "softmax(logits)" for r in rows.values())
    assert all(abs(sum(r["probs"]) - 1) < 1 for r in rows.values())
    never, spec, _ = run(tmp_path / "never", model, photos, softmax="never")
    assert spec.scores == "logits"
    check_top5(never, logits, key="logits")
    assert all(r["scores"] == "logits" and "probs" not in r for r in never.values())


@pytest.mark.e2e
def test_softmax_always_on_a_probability_model(tmp_path, photos):
    model = tiny_classifier()
    rows, spec, store = run(tmp_path, model, photos, softmax="always")
    assert spec.scores == "softmax(logits)"
    check_top5(rows, {k: softmax(v) for k, v in reference(model, store).items()})


@pytest.mark.e2e
def test_inception_preprocessing_is_recorded_and_applied(tmp_path, photos):
    transform = make_transform("inception")
    assert transform == {"name": "inception", "resize": None, "mean": [0.5] * 3,
                         "std": [0.5] * 3}
    model = tiny_classifier()
    rows, spec, store = run(tmp_path, model, photos, transform=transform)
    saved = json.loads((tmp_path / "store" / "j" / "job.json").read_text())
    assert saved["transform"] == transform
    check_top5(rows, reference(model, store, transform))
    x = preprocess(read_record(store.get_bytes("j/records/00000.tfrecord"))[0].encoded, SIZE,
                   mean=transform["mean"], std=transform["std"])
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.2


@pytest.mark.e2e
def test_cli_prints_and_records_explicit_preprocessing(tmp_path, photos):
    model = save(tiny_classifier(), tmp_path / "m.onnx")
    store = tmp_path / "store"
    args = ["run", "--job", "p", "--input", str(photos), "--model", model, "--store", str(store),
            "--resize", "20", "--crop", "16,16", "--mean", "0,0,0", "--std", "0.5,0.5,0.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert ("preprocess: custom (shorter side 20, center crop 16x16, [0, 1] pixels, mean "
            "[0, 0, 0], std [0.5, 0.5, 0.5])") in result.output.splitlines()
    assert "scores: probs" in result.output.splitlines()
    assert "packing 10 images into records of 1000…" in result.output.splitlines()
    saved = json.loads((store / "p" / "job.json").read_text())
    assert saved["transform"] == {"name": "custom", "resize": 20, "mean": [0.0] * 3,
                                  "std": [0.5] * 3}
    bad = runner.invoke(app, [*args[:-8], "--crop", "8,8", "--job", "q"])
    assert bad.exit_code == 2
    assert "--crop 8,8 differs from the model's input 16x16" in bad.output
    bad = runner.invoke(app, [*args[:-8], "--preprocess", "vgg", "--job", "q"])
    assert bad.exit_code == 2
    assert "--preprocess must be one of imagenet, inception, raw, got 'vgg'" in bad.output


def test_bad_softmax_choice_is_refused(tmp_path, photos):
    path = save(tiny_classifier(), tmp_path / "m.onnx")
    with pytest.raises(JobError, match="--softmax must be auto, always or never, got 'yes'"):
        prepare_job(Store(str(tmp_path / "s")), "j", path, records=str(photos), softmax="yes")


@pytest.mark.e2e
def test_user_model_file_runs(tmp_path, records_dir):
    """A user .onnx file works where a model is named (here: AlexNet exported to a file)."""
    path = tmp_path / "alex.onnx"
    save_model(build_alexnet(seed=1), path)
    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "user", str(path), cuts="pool2", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    assert result.ok and spec.stages == 2
    assert_one_row_per_image(rows_of(store, "user"), 60)


@pytest.mark.e2e
def test_user_model_with_its_own_input_size(tmp_path, records_dir):
    import onnx

    model = tiny_conv_classifier(64, 48, channels=8)  # non-square, cut at "r1"
    path = tmp_path / "small.onnx"
    onnx.save(model, path)
    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "small", str(path), cuts="r1", records=str(records_dir))
    assert spec.input_hw == [64, 48]
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    assert result.ok
    rows = rows_of(store, "small")
    assert len(rows) == 60
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for r in rows[:10]:
        ex = read_record((records_dir / f"{r['record']}.tfrecord").read_bytes())[r["index"]]
        x = preprocess(ex.encoded, (64, 48))[None]
        assert x.shape == (1, 3, 64, 48)
        (p,) = sess.run(None, {"img": x})
        np.testing.assert_allclose(p[0][r["top5"]], r["probs"], atol=1e-5)
