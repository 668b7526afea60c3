"""int8 and float16-weight stages: they chain and run end to end, their fidelity figures are
computed from the models, and a second job on the same model and images reuses the cache."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from helpers import assert_one_row_per_image, rows_of
from typer.testing import CliRunner

from serveless.backends.local import LocalBackend
from serveless.cli import app
from serveless.data.records import Example
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.driver.spec import JobSpec
from serveless.errors import JobError
from serveless.model import quantize as q
from serveless.model.partition import split
from serveless.store import Store

runner = CliRunner()


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


@pytest.fixture(scope="module")
def int8_job(tmp_path_factory, digits_records):
    store = Store(str(tmp_path_factory.mktemp("store")))
    spec = prepare_job(store, "q8", "digits", cuts="pool1", records=str(digits_records),
                       quantize="int8", calibration_images=32)
    with LocalBackend() as backend:
        result = run_job(store, spec, backend, concurrency=2, progress=False)
    return store, spec, result


@pytest.mark.e2e
def test_int8_stages_chain_and_run_end_to_end(int8_job, digits_model):
    store, spec, result = int8_job
    assert result.ok and result.images == 120 and spec.stages == 2
    rows = rows_of(store, "q8")
    assert_one_row_per_image(rows, 120)
    assert all(r["error"] is None and len(r["top5"]) == 5 for r in rows)
    for k in range(2):  # the stored stages are the int8 ones, float at their boundaries
        stage = onnx.load(store.local_path(spec.stage_model_key(k)))
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(stage)
        assert stage.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert stage.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert "Softmax" in _ops(stage)  # the last stage's Softmax stays float
    top1 = np.mean([r["top5"][0] == r["label"] for r in rows])
    assert top1 >= 0.95  # a trained model stays accurate in int8


@pytest.mark.e2e
def test_int8_job_records_sensible_fidelity(int8_job):
    store, spec, _ = int8_job
    info = JobSpec.load(store, "q8").quantize
    assert info["mode"] == "int8" and info["calibration_images"] == 32
    assert info["cache_hit"] is False and info["cache"].startswith("models/int8-")
    f = info["fidelity"]
    assert f["images"] == 120 - 32 and f["labelled"] == f["images"]  # held out = the rest
    assert f["top1_agreement"] >= 0.95 and f["top5_overlap"] >= 0.9
    assert f["accuracy_top1_fp32"] >= 0.95
    assert abs(f["accuracy_top1_quantized"] - f["accuracy_top1_fp32"]) <= 0.03
    lines = q.summary_lines(info)
    assert "calibrated on 32 images" in lines[0]
    assert f"on {f['images']} held-out images" in lines[1] and "top-1 accuracy" in lines[1]


@pytest.mark.e2e
def test_second_job_reuses_the_cached_stages(int8_job, digits_records, counted_partition):
    store, spec, _ = int8_job
    again = prepare_job(store, "q8-again", "digits", cuts="pool1", records=str(digits_records),
                        quantize="int8", calibration_images=32)
    assert again.quantize["cache_hit"] is True
    assert counted_partition == []  # a cached int8 set: no fp32 partition, no check
    assert again.quantize["cache"] == spec.quantize["cache"]
    assert again.quantize["fidelity"] == spec.quantize["fidelity"]
    assert again.models == spec.models  # the same stored int8 stages, shared
    other = prepare_job(store, "q8-other", "digits", cuts="pool1", records=str(digits_records),
                        quantize="int8", calibration_images=16)  # another calibration set
    assert other.quantize["cache_hit"] is False
    assert other.quantize["cache"] != spec.quantize["cache"]
    assert counted_partition == [["pool1"]]  # a miss: partitioned (and checked) once


@pytest.mark.e2e
def test_resume_keeps_the_precision_and_refuses_another(int8_job, digits_records):
    store, spec, _ = int8_job
    with pytest.raises(JobError, match="--quantize int8"):
        prepare_job(store, "q8", "digits", cuts="pool1", weights="float16")
    before = store.get_bytes(spec.stage_model_key(1))
    resumed = prepare_job(store, "q8")  # options left out: as the job has them
    assert resumed.precision == "int8" and resumed.quantize == spec.quantize
    assert resumed.models == spec.models  # the same int8 stages
    assert store.get_bytes(resumed.stage_model_key(1)) == before


def test_fidelity_figures_recompute(digits_model, digits_records):
    stages = split(digits_model, ["pool1"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    same = q.fidelity(digits_model, stages, x, np.array([0, 1, 2, -1, -1, -1]))
    assert same.top1_agreement == 1.0 and same.top5_overlap == 1.0
    assert same.labelled == 3 and same.accuracy_top1_fp32 == same.accuracy_top1_quantized
    # negated logits rank the classes in reverse: top-1 never agrees, and the new top-5 is
    # the old bottom-5 of 10 classes, so the overlap is 0
    last = onnx.ModelProto()
    last.CopyFrom(stages[1])
    for init in last.graph.initializer:
        if init.name in ("fc.weight", "fc.bias"):
            arr = -onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    flipped = q.fidelity(digits_model, [stages[0], last], x)
    assert flipped.top1_agreement == 0.0 and flipped.top5_overlap == 0.0
    assert flipped.accuracy_top1_fp32 is None


def test_float16_weights_halve_the_stages_and_stay_close(digits_model):
    stages = split(digits_model, ["pool1"])
    half = q.float16_weights(stages)
    big = [t for t in half[1].graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert big and "Cast" in _ops(half[1])
    assert half[1].ByteSize() < 0.6 * stages[1].ByteSize()
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    f = q.fidelity(digits_model, half, x)
    assert f.top1_agreement == 1.0


def test_select_images_is_disjoint_and_deterministic():
    def rec(n: int, tag: str) -> list[Example]:
        return [Example(f"{tag}{i}".encode(), f"{tag}{i}.jpg", i % 3) for i in range(n)]

    records = {"a": rec(10, "a"), "b": rec(7, "b")}

    def opener(name):
        import io

        from serveless.data.records import write_record

        buf = io.BytesIO()
        write_record(buf, records[name])
        return lambda: io.BytesIO(buf.getvalue())

    srcs = [(n, opener(n)) for n in records]
    cal, held = q.select_images(srcs, 5, 100)
    assert len(cal) == 5 and len(held) == 12
    names = [e.filename for e in cal + held]
    assert len(set(names)) == 17
    assert names[:5] != ["a0", "a1", "a2", "a3", "a4"]  # a seeded draw, not the first N
    cal2, held2 = q.select_images(srcs, 5, 100)
    assert [e.filename for e in cal2 + held2] == names
    small_cal, small_held = q.select_images(srcs, 64, 4)  # fewer images than asked
    assert len(small_cal) == 9 and len(small_held) == 4


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int4"], "--quantize must be one of int8"),
    (["--weights", "bfloat16"], "--weights must be one of float16"),
    (["--quantize", "int8", "--weights", "float16"], "not both"),
    (["--quantize", "int8", "--calibration-images", "0"], "--calibration-images must be >= 1"),
])
def test_bad_precision_settings_are_one_line_errors(tmp_path, digits_records, args, message):
    res = runner.invoke(app, ["run", "--job", "bad", "--model", "digits", "--records",
                              str(digits_records), "--store", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_partition_writes_int8_stages_and_prints_fidelity(tmp_path, digits_records):
    out = tmp_path / "stages"
    res = runner.invoke(app, ["partition", "digits", "--cuts", "pool1", "--out", str(out),
                              "--quantize", "int8", "--records", str(digits_records),
                              "--calibration-images", "16"])
    assert res.exit_code == 0, res.output
    assert "wrote 2 int8 stages" in res.output
    m = re.search(r"on (\d+) held-out images: top-1 agreement ([\d.]+)%", res.output)
    assert m and int(m.group(1)) == 104 and float(m.group(2)) >= 90
    assert "QuantizeLinear" in _ops(onnx.load(str(out / "stage-0.onnx")))
    res = runner.invoke(app, ["partition", "digits", "--cuts", "pool1", "--out", str(out),
                              "--quantize", "int8"])
    assert res.exit_code == 2 and "need --records" in res.output


def test_the_cache_key_takes_the_file_hash_and_matches_the_serialisation_hash(digits_model):
    """A job hands the model file's hash (filehash.py) instead of hashing 244 MB again; for
    a file that is the model's serialisation the key is the one it always was."""
    import hashlib

    from serveless.data.records import Example

    model = digits_model
    cal = [Example(b"jpeg-bytes-%d" % i) for i in range(3)]
    args = (model, ["pool1"], "int8", cal, {}, [32, 32])
    own = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    assert q._digest(*args, model_hash=own) == q._digest(*args)
    assert q._digest(*args, model_hash="ab" * 32) != q._digest(*args)
