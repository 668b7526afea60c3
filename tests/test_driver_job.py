"""End to end on the local backend: every image gets exactly one row, equal to the whole model."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from helpers import rows_of, tiny_conv_classifier, whole_model_probs

from serveless.backends.local import LocalBackend
from serveless.data.images import preprocess
from serveless.data.records import read_record
from serveless.driver.log import load_log
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.errors import JobError
from serveless.store import JobLayout, Store


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, records_dir):
    store = Store(str(tmp_path_factory.mktemp("store")))
    spec = prepare_job(store, "e2e", "alexnet", preset="paper", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    return store, spec, result


def test_every_image_has_one_row_equal_to_the_whole_model(finished_job, records_dir, alexnet):
    store, spec, result = finished_job
    assert spec.stages == 4 and result.ok
    rows = rows_of(store, "e2e")
    keys = [(r["record"], r["index"]) for r in rows]
    assert len(keys) == 60 and len(set(keys)) == 60
    assert sorted(r["record"] for r in rows).count("00002") == 10  # the short last record
    expected = whole_model_probs(alexnet, records_dir)
    assert set(expected) == set(keys)
    worst = 0.0
    for r in rows:
        probs = expected[(r["record"], r["index"])]
        assert r["error"] is None and r["label"] in (0, 1, 2)
        assert r["filename"].endswith(".jpg")
        worst = max(worst, float(np.max(np.abs(probs[r["top5"]] - np.array(r["probs"])))))
        top = np.sort(probs)[::-1][:5]
        np.testing.assert_allclose(np.array(r["probs"]), top, atol=1e-4)
    assert worst <= 1e-4


def test_invocation_log_has_one_line_per_invocation(finished_job):
    store, spec, result = finished_job
    log = load_log(store, "e2e")
    assert len(log) == 3 * 4  # records x stages, no failures
    assert {(r["record"], r["stage"]) for r in log} == {
        (rec, k) for rec in ("00000", "00001", "00002") for k in range(4)}
    for r in log:
        assert r["error"] is None
        assert r["billed_ms"] == math.ceil(r["duration_ms"]) + math.ceil(r["init_ms"])
        assert r["peak_mb"] > 50 and r["bytes_in"] > 0 and r["bytes_out"] > 0
        # the call's own CPU (all its threads), not the instance's since its start
        assert 0 < r["cpu_ms"] <= r["duration_ms"] * (os.cpu_count() or 1) + 20
    # the first invocation of each instance is cold and reports init; later ones are warm
    by_instance: dict[str, list[dict]] = {}
    for r in sorted(log, key=lambda r: r["started"]):
        by_instance.setdefault(r["instance"], []).append(r)
    for calls in by_instance.values():
        assert calls[0]["cold"] and calls[0]["init_ms"] > 0
        assert all(not c["cold"] and c["init_ms"] == 0 for c in calls[1:])
    assert any(len(c) > 1 for c in by_instance.values())  # instances were reused


def test_store_layout_matches_design(finished_job):
    store, spec, _ = finished_job
    lay = JobLayout("e2e")
    assert store.exists(lay.spec)
    assert spec.models.startswith("models/")  # shared by jobs of the same model and cuts
    for k in range(4):
        assert store.exists(spec.stage_model_key(k))
        assert spec.stage_model_key(k).startswith(spec.models + "/")
    for rec in spec.records:
        assert store.exists(lay.record(rec)) and store.exists(lay.predictions(rec))
        for k in range(3):
            assert store.exists(lay.stage_output(k, rec))


def test_single_stage_job(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "one", "alexnet", records=str(records_dir), memory="3008")
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=1, progress=False)
    assert result.ok and spec.stages == 1
    assert len(rows_of(store, "one")) == 60


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, records_dir):
    store = Store(str(tmp_path))
    with pytest.raises(JobError, match="4 stages"):
        prepare_job(store, "j", "alexnet", preset="paper", memory="1024,1024",
                    records=str(records_dir))
    with pytest.raises(JobError, match="outside"):
        prepare_job(store, "j", "alexnet", memory="64", records=str(records_dir))
    with pytest.raises(ValueError, match="job name"):
        prepare_job(store, "../evil", "alexnet", records=str(records_dir))
    with pytest.raises(JobError, match="no records"):
        prepare_job(store, "j", "alexnet", records=str(tmp_path / "nothing"))
    assert list(tmp_path.iterdir()) == []


def test_demo_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "serveless.cli", "demo", "--images", "40", "--store", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "40 images" in out.stdout and "GB-s" in out.stdout and "per 1M images" in out.stdout
    preds = sorted((tmp_path / "demo" / "predictions").glob("*.jsonl"))
    assert preds and sum(len(p.read_text().splitlines()) for p in preds) == 40
    log = tmp_path / "demo" / "invocations.jsonl"
    assert len(log.read_text().splitlines()) == 4  # one record, four stages
    assert str(log) in out.stdout.replace("\n", "")


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


def test_intermediates_can_be_dropped_once_a_record_is_done(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "drop", "alexnet", preset="paper", records=str(records_dir))
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False,
                         keep_intermediates=False)
    assert result.ok and len(rows_of(store, "drop")) == 60
    lay = JobLayout("drop")
    for k in range(3):
        assert store.list(lay.key(f"stage-{k}")) == []
    assert all(store.exists(lay.record(r)) for r in spec.records)  # inputs are never dropped


def test_records_with_the_same_name_are_refused(tmp_path, records_dir):
    import shutil

    for sub in ("a", "b"):
        shutil.copytree(records_dir, tmp_path / "in" / sub)
    store = Store(str(tmp_path / "s"))
    with pytest.raises(JobError, match="two records named"):
        prepare_job(store, "dup", "alexnet", records=str(tmp_path / "in" / "*" / "*.tfrecord"))


def test_resume_refuses_other_settings_and_keeps_raised_memory(tmp_path, records_dir):
    store = Store(str(tmp_path))
    spec = prepare_job(store, "re", "alexnet", preset="paper", records=str(records_dir))
    spec.memory = [1769, 1769, 1769, 576]  # as after an OutOfMemory raise
    spec.save(store)
    with pytest.raises(JobError, match="cuts"):
        prepare_job(store, "re", "alexnet", cuts="pool2", records=str(records_dir))
    again = prepare_job(store, "re", "alexnet", preset="paper", records=str(records_dir))
    assert again.memory == [1769, 1769, 1769, 576]
    explicit = prepare_job(store, "re", "alexnet", preset="paper", memory="2048",
                           records=str(records_dir))
    assert explicit.memory == [2048] * 4


def test_stage_0_decodes_inline_up_to_1_vcpu_and_on_a_thread_above(
        tmp_path, records_dir, monkeypatch):
    """At 1 vCPU or less a decode thread cannot overlap the model (one CPU's quota), it
    only switches with it; above, it does. Same outputs either way."""
    import onnx

    from serveless.runtime import handler, loader

    path = tmp_path / "small.onnx"
    onnx.save(tiny_conv_classifier(), path)
    store = Store(str(tmp_path / "s"))
    spec = prepare_job(store, "inline", str(path), cuts="r1", records=str(records_dir))
    threads: list[int] = []
    real = handler.prefetch

    def spy(blocks, depth=1):
        threads.append(1)
        return real(blocks, depth)

    monkeypatch.setattr(handler, "prefetch", spy)
    record = spec.records[0]
    written = {}
    for memory in (1769, 1770, 512, 3008):
        event = {"store": store.spec(), "job": "inline", "stage": 0, "stages": spec.stages,
                 "record": record, "size": spec.input_hw, "memory_mb": memory,
                 "model": spec.stage_model_key(0)}
        threads.clear()
        out = handler.handle(event)
        written[memory] = out["output"]["crc32c"]
        assert threads == ([1] if memory > 1769 else []), memory
        threads.clear()  # a later stage reads its input on a thread at any size
        handler.handle({**event, "stage": 1, "model": spec.stage_model_key(1)})
        assert threads == [1]
    loader._SESSIONS.clear()
    assert len(set(written.values())) == 1
