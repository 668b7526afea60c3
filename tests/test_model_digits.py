"""The trained digits model: accuracy from a fixed seed, determinism, cache, its preprocessing,
and the labelled-job accuracy it makes meaningful (demo, summary, report, report.md)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import rows_of
from typer.testing import CliRunner

from serveless.backends.local import LocalBackend
from serveless.cli import app
from serveless.data.images import preprocess
from serveless.data.predictions import accuracy
from serveless.data.records import read_record
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.errors import ModelError
from serveless.model import digits
from serveless.model.graph import PREPROCESS_KEY, check_image_model, preprocessing
from serveless.store import Store

runner = CliRunner()
_REAL_TRAIN = digits.train


def _heldout_top1(model: onnx.ModelProto) -> float:
    data = digits.load_data(0)
    x = np.stack([preprocess(data.jpegs[i], 32, resize=32) for i in data.heldout])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(None, {"input": x})
    return float(np.mean(probs.argmax(1) == data.labels[data.heldout]))


def test_digits_reaches_its_accuracy_from_a_fixed_seed(digits_model):
    assert check_image_model(digits_model) == ("input", (3, 32, 32))
    data = digits.load_data(0)
    assert len(data.heldout) == 450 and len(data.train) == 1797 - 450
    assert not set(data.heldout) & set(data.train)
    top1 = _heldout_top1(digits_model)  # through onnxruntime, on stage 0's own pixels
    assert top1 >= 0.97
    recorded = {p.key: p.value for p in digits_model.metadata_props}["serveless.heldout_top1"]
    assert abs(float(recorded) - top1) < 1e-6  # what numpy measured is what ONNX computes


def test_training_is_deterministic_for_a_seed():
    full = digits.load_data(0)
    small = digits.DigitsData(full.jpegs, full.labels, full.train[:256], full.heldout[:64])
    a, _ = digits.train(seed=0, epochs=1, data=small)
    b, _ = digits.train(seed=0, epochs=1, data=small)
    c, _ = digits.train(seed=1, epochs=1, data=small)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_digits_is_cached_and_not_retrained(digits_model, model_cache, monkeypatch):
    files = list(model_cache.glob("digits-v*-seed0.onnx"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(digits, "train", no_training)
    again = digits.build_digits(0)
    assert again.SerializeToString() == digits_model.SerializeToString()
    original = files[0].read_bytes()
    try:
        files[0].write_bytes(b"torn")  # a broken cache file is replaced, not trusted
        calls = []

        def short_training(seed, **kwargs):
            calls.append(seed)
            full = digits.load_data(0)
            small = digits.DigitsData(full.jpegs, full.labels, full.train[:64], full.heldout[:8])
            return _REAL_TRAIN(seed, epochs=1, data=small)

        monkeypatch.setattr(digits, "train", short_training)
        rebuilt = digits.build_digits(0)
        assert calls == [0] and rebuilt.graph.node
        assert onnx.load(str(files[0])).SerializeToString() == rebuilt.SerializeToString()
    finally:
        files[0].write_bytes(original)


def test_model_declares_its_preprocessing(digits_model, alexnet):
    assert preprocessing(digits_model) == {"resize": 32}
    assert preprocessing(alexnet) == {}
    bad = onnx.ModelProto()
    bad.CopyFrom(digits_model)
    for value in ('{"resize": 0}', '{"size": 32}', "not json"):
        del bad.metadata_props[:]
        onnx.helper.set_model_props(bad, {PREPROCESS_KEY: value})
        with pytest.raises(ModelError):
            preprocessing(bad)


@pytest.mark.e2e
def test_stage0_uses_the_models_preprocessing(tmp_path, digits_model, digits_records):
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "dg", "digits", cuts="pool1", records=str(digits_records))
    assert spec.preprocess == {"resize": 32} and spec.input_hw == [32, 32]
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    assert result.ok and result.images == 120
    sess = ort.InferenceSession(digits_model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    expected = {}
    for path in sorted(digits_records.glob("*.tfrecord")):
        examples = read_record(path.read_bytes())
        x = np.stack([preprocess(ex.encoded, 32, resize=32) for ex in examples])
        for i, p in enumerate(sess.run(None, {"input": x})[0]):
            expected[(path.stem, i)] = p
    rows = rows_of(store, "dg")
    assert len(rows) == 120
    for r in rows:
        p = expected[(r["record"], r["index"])]
        np.testing.assert_allclose(r["probs"], np.sort(p)[::-1][:5], atol=1e-5)
    acc = accuracy(store, "dg")
    assert acc is not None and acc["labelled"] == 120
    want = np.mean([int(np.argmax(expected[(r["record"], r["index"])])) == r["label"]
                    for r in rows])
    assert acc["top1"] == pytest.approx(want) and acc["top1"] >= 0.95
    assert acc["top5"] >= acc["top1"]


def test_accuracy_is_none_without_labels(tmp_path):
    store = Store(str(tmp_path))
    store.put_bytes("j/predictions/00000.jsonl",
                    b'{"label": null, "top5": [1, 2], "error": null}\n')
    assert accuracy(store, "j") is None
    store.put_bytes("j/predictions/00001.jsonl",
                    b'{"label": 2, "top5": [1, 2], "error": null}\n'
                    b'{"label": 1, "top5": [1, 2], "error": null}\n'
                    b'{"label": 1, "top5": null, "error": {"type": "ImageDecodeError"}}\n')
    assert accuracy(store, "j") == {"labelled": 2, "top1": 0.5, "top5": 1.0}


@pytest.mark.e2e
def test_demo_digits_prints_accuracy_and_report_shows_it(tmp_path, digits_model):
    store = str(tmp_path / "store")
    res = runner.invoke(app, ["demo", "--model", "digits", "--images", "40", "--per-record",
                              "20", "--store", store, "--memory", "512"])
    assert res.exit_code == 0, res.output
    assert "wrote 40 held-out digits" in res.output
    m = re.search(r"accuracy on (\d+) labelled images: top-1 ([\d.]+)%, top-5 ([\d.]+)%",
                  res.output)
    assert m and int(m.group(1)) == 40
    assert float(m.group(2)) >= 90.0 and float(m.group(3)) >= float(m.group(2))
    acc = accuracy(Store(store), "demo")
    assert float(m.group(2)) == pytest.approx(acc["top1"] * 100, abs=0.005)
    rep = runner.invoke(app, ["report", "demo", "--store", store])
    assert rep.exit_code == 0 and m.group(0) in rep.output
    out = tmp_path / "rep"
    rep = runner.invoke(app, ["report", "demo", "--store", store, "--out", str(out)])
    assert rep.exit_code == 0, rep.output
    md = (out / "report.md").read_text()
    assert m.group(0) in md and "| precision | fp32 |" in md


def test_demo_refuses_an_unknown_model(tmp_path):
    res = runner.invoke(app, ["demo", "--model", "resnet", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "--model must be one of" in res.output
