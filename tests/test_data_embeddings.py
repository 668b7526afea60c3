"""Embeddings out (issue 23, item 5): `run --output embeddings [--tensor NAME]` stores every
image's vector of the named tensor as `<job>/embeddings/<r>.npy` beside a row per image,
equal to that tensor of the whole model run in onnxruntime directly; a failed image has an
error row and a NaN vector; `export --format parquet` writes a fixed-size list column that
pyarrow and DuckDB read as is; plan and simulate price the vectors' bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from datakit import encode, picture
from helpers import assert_one_row_per_image, rows_of, run_local
from onnx import TensorProto, helper
from plankit import synthetic_calibration
from typer.testing import CliRunner

from serveless.cli import app
from serveless.data.export import EMBEDDING_COLUMNS, export
from serveless.data.images import preprocess
from serveless.data.records import read_record
from serveless.data.tensors import TensorFormat
from serveless.driver.prepare import prepare_job
from serveless.errors import CalibrationError, ExportError, JobError, PartitionError
from serveless.planning.embeddings import EMBEDDING_ROW_BYTES, for_output
from serveless.planning.simulate import Target, simulate
from serveless.store import JobLayout, Store

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
runner = CliRunner()
BROKEN = "class_001/broken.jpg"


@pytest.fixture(scope="module")
def photos(tmp_path_factory, image_dir) -> Path:
    """The session's 60 sample photos and one broken JPEG."""
    root = tmp_path_factory.mktemp("emb-photos") / "photos"
    shutil.copytree(image_dir, root)
    (root / BROKEN).write_bytes(encode(picture(5), "JPEG")[:200])
    return root


def reference(model_path: str, store: Store, job: str, tensor: str) -> dict:
    """The named tensor of the whole model, run in onnxruntime directly on the job's own
    records (the images in record order), by (record, index); none for a broken image."""
    run = tensor_of(model_path, tensor)
    out = {}
    for key in store.list(JobLayout(job).records_prefix, ".tfrecord"):
        record = key.rsplit("/", 1)[-1].removesuffix(".tfrecord")
        for i, ex in enumerate(read_record(store.get_bytes(key))):
            if not ex.filename.endswith("broken.jpg"):
                out[(record, i)] = run(ex.encoded)
    return out


def tensor_of(model_path: str, tensor: str):
    """A function from an image's bytes to the named tensor of the whole model, run in
    onnxruntime directly."""
    model = onnx.load(model_path)
    model.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (feed,) = sess.get_inputs()

    def run(data: bytes) -> np.ndarray:
        x = preprocess(data, tuple(feed.shape[2:]))
        return sess.run([tensor], {feed.name: x[None]})[0].reshape(-1)

    return run


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, photos, tiny_model_path) -> tuple[Store, str]:
    """The photos through the tiny model cut at r1, storing the vectors of f (8 wide)."""
    store = Store(str(tmp_path_factory.mktemp("emb-store")))
    spec = prepare_job(store, "emb", tiny_model_path, cuts="r1", records=str(photos),
                       per_record=25, output="embeddings", tensor="f")
    run_local(store, spec, image_errors=1)
    return store, "emb"


@pytest.mark.e2e
def test_vectors_equal_the_named_tensor_of_the_whole_model(embedded, tiny_model_path):
    store, job = embedded
    rows = rows_of(store, job)
    assert_one_row_per_image(rows, 61)
    expected = reference(tiny_model_path, store, job, "f")
    assert len(expected) == 60
    by_record: dict[str, np.ndarray] = {}
    for key in store.list(JobLayout(job).embeddings_prefix, ".npy"):
        record = key.rsplit("/", 1)[-1].removesuffix(".npy")
        by_record[record] = np.load(store.path(key), allow_pickle=False)
    assert sorted(by_record) == sorted({r["record"] for r in rows})
    for r in rows:
        vectors = by_record[r["record"]]
        assert vectors.dtype == np.float32 and vectors.shape[1] == 8
        assert r["output"] == "embeddings" and "top5" not in r
        assert r["id"] == r["filename"] and r["label"] in (0, 1, 2)
        vec = vectors[r["index"]]
        if r["filename"] == BROKEN:
            assert r["error"] and np.isnan(vec).all()
            continue
        assert r["error"] is None
        np.testing.assert_allclose(vec, expected[(r["record"], r["index"])], atol=1e-4)
    assert sum(len(v) for v in by_record.values()) == 61


@pytest.mark.e2e
def test_float16_vectors_in_one_stage(tmp_path, photos, tiny_model_path):
    """--float16 stores the vectors as float16; the default tensor is the model's output."""
    store = Store(str(tmp_path))
    spec = prepare_job(store, "h", tiny_model_path, records=str(photos), per_record=40,
                       fmt=TensorFormat("float16"), output="embeddings")
    run_local(store, spec, image_errors=1)
    expected = reference(tiny_model_path, store, "h", "p")
    rows = rows_of(store, "h")
    assert_one_row_per_image(rows, 61)
    for r in rows:
        vectors = np.load(store.path(JobLayout("h").embeddings(r["record"])))
        assert vectors.dtype == np.float16 and vectors.shape[1] == 10
        if r["error"] is None:
            np.testing.assert_allclose(vectors[r["index"]].astype(np.float32),
                                       expected[(r["record"], r["index"])], rtol=2e-3,
                                       atol=1e-4)


@pytest.mark.e2e
def test_parquet_export_is_a_fixed_size_list_that_pyarrow_and_duckdb_read(embedded, tmp_path):
    store, job = embedded
    out = tmp_path / "e.parquet"
    assert export(store, job, "parquet", str(out)) == 61
    table = pq.read_table(out)
    assert table.column_names == list(EMBEDDING_COLUMNS)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    rows = table.to_pylist()
    stored = {(r["record"], r["index"]): r for r in rows_of(store, job)}
    for r in rows:
        vec = np.load(store.path(JobLayout(job).embeddings(r["record"])))[r["index"]]
        assert r["id"] == stored[(r["record"], r["index"])]["id"]
        if r["filename"] == BROKEN:
            assert r["embedding"] is None and r["error"]
        else:
            assert r["embedding"] == vec.tolist()
    assert export(store, job, "jsonl", str(tmp_path / "e.jsonl")) == 61
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert lines == rows
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"select count(*), count(embedding), max(len(embedding)), "
                     f"min(array_cosine_similarity(embedding::FLOAT[8], embedding::FLOAT[8])) "
                     f"from '{out}'").fetchall()[0]
    assert got[0] == 61 and got[1] == 60 and got[2] == 8 and abs(got[3] - 1) < 1e-6
    with pytest.raises(ExportError, match="stored embeddings, not scores"):
        export(store, job, "parquet", str(tmp_path / "x.parquet"), with_scores=True)


def shape_input(shape: str, root: Path, image_dir: Path) -> tuple[Path, dict, dict]:
    """The session's photos as `shape`, written by the library its users write it with,
    with one broken image or unreachable entry: (the input, prepare_job's columns, the
    image bytes by the id the row will carry)."""
    files = sorted(image_dir.rglob("*.jpg"), key=lambda p: p.relative_to(image_dir).parts)
    src = root / "in"
    src.mkdir()
    by_id: dict = {}
    if shape == "webdataset":
        wds = pytest.importorskip("webdataset")
        with wds.TarWriter(str(src / "shard-000000.tar")) as sink:
            for p in files:
                sink.write({"__key__": p.stem, "jpg": p.read_bytes(),
                            "cls": int(p.parent.name[-1])})
                by_id[p.stem] = p.read_bytes()
            sink.write({"__key__": "broken", "jpg": encode(picture(5), "JPEG")[:200]})
        return src, {}, by_id
    if shape == "parquet":
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_dict({
            "image": [{"bytes": p.read_bytes(), "path": p.name} for p in files]
            + [{"bytes": encode(picture(5), "JPEG")[:200], "path": "broken.jpg"}],
            "uid": [f"uid-{p.stem}" for p in files] + ["uid-broken"]})
        ds.cast_column("image", datasets.Image()).to_parquet(str(src / "t.parquet"),
                                                              batch_size=16)
        by_id = {f"uid-{p.stem}": p.read_bytes() for p in files}
        return src, {"id": "uid"}, by_id
    lines = [json.dumps({"url": str(p), "uid": f"m-{p.stem}"}) for p in files]
    lines.append(json.dumps({"url": str(root / "missing.jpg"), "uid": "m-missing"}))
    manifest = src / "list.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, {"id": "uid"}, {f"m-{p.stem}": p.read_bytes() for p in files}


@pytest.mark.e2e
@pytest.mark.parametrize("shape", ["webdataset", "parquet", "manifest"])
def test_every_input_shape_stores_the_tensor_of_its_images(shape, tmp_path, image_dir,
                                                           tiny_model_path):
    """Shards, tables and manifests (each written by its users' library): the vector of
    every row's image equals the named tensor of the whole model on that image, by the
    row's id; the broken image or unreachable entry has its error row and a NaN vector."""
    src, columns, by_id = shape_input(shape, tmp_path, image_dir)
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "e", tiny_model_path, cuts="r1", records=str(src),
                       per_record=25, columns=columns, output="embeddings", tensor="f")
    run_local(store, spec, image_errors=1)
    rows = rows_of(store, "e")
    assert_one_row_per_image(rows, 61)
    expected = tensor_of(tiny_model_path, "f")
    layout = JobLayout("e")
    for r in rows:
        vec = np.load(store.path(layout.embeddings(r["record"])))[r["index"]]
        if r["id"] not in by_id:
            assert r["error"] and np.isnan(vec).all(), r
            continue
        assert r["error"] is None
        np.testing.assert_allclose(vec, expected(by_id[r["id"]]), atol=1e-4)
    assert sorted(r["id"] for r in rows if r["error"] is None) == sorted(by_id)


def test_options_without_meaning_for_the_output_are_refused(tmp_path, photos,
                                                            tiny_model_path):
    store = Store(str(tmp_path / "s"))
    cases = [
        (dict(tensor="f"), JobError, "add --output embeddings"),
        (dict(output="embeddings", save_scores=True), JobError, "stores every image's vector"),
        (dict(output="embeddings", softmax="always"), JobError, "--softmax is for predictions"),
        (dict(output="vectors"), JobError, "--output must be one of predictions, embeddings"),
        (dict(output="embeddings", tensor="g", cuts="f"), PartitionError,
         "cut 'f' is not before --tensor 'g'"),
        (dict(output="embeddings", tensor="w2"), PartitionError,
         "the tensors an embeddings job can store: c1, r1, g, f, logits, or the model's "
         "output 'p'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            prepare_job(store, "j", tiny_model_path, records=str(photos), **kwargs)
        assert not (tmp_path / "s" / "j").exists(), kwargs  # nothing written


@pytest.mark.e2e
def test_a_resume_may_not_change_the_output_or_tensor(embedded, tiny_model_path):
    store, job = embedded
    with pytest.raises(JobError, match="started with --tensor f, not --tensor g"):
        prepare_job(store, job, tensor="g")
    with pytest.raises(JobError, match="started with --output embeddings, not --output "
                                       "predictions"):
        prepare_job(store, job, output="predictions")
    spec = prepare_job(store, job)  # options left out: as the job has them
    assert (spec.output, spec.tensor, spec.cuts) == ("embeddings", "f", ["r1"])
    # the stages end at the tensor: not the set of a predictions job of the same cuts
    whole = prepare_job(store, "whole", tiny_model_path, cuts="r1",
                        records=str(store.path(JobLayout(job).records_prefix)))
    assert whole.models != spec.models


def test_the_planner_prices_the_vectors_written():
    """The calibration of an embeddings job ends at its tensor and writes D × 4 bytes and a
    row per image; wider vectors cost more in the simulation, float16 halves them."""
    cal = synthetic_calibration()
    at_b1 = for_output(cal, "embeddings", "b1")
    assert [b["index"] for b in at_b1["blocks"]] == [0, 1] and at_b1["boundaries"] == ["b0"]
    assert at_b1["blocks"][-1]["bytes_out_per_image"] == 150_000 + EMBEDDING_ROW_BYTES
    half = for_output(cal, "embeddings", "b1", float16=True)
    assert half["blocks"][-1]["bytes_out_per_image"] == 75_000 + EMBEDDING_ROW_BYTES
    assert cal["blocks"][1]["bytes_out_per_image"] == 150_000  # the input is not changed
    assert for_output(cal) is cal
    plan = {"cuts": [], "memory": [1769], "images_per_record": 100, "micro_batch": 16,
            "concurrency": 4, "images": 2000, "arch": "x86_64"}
    target = Target.make("lambda", cal)

    def simulated(c: dict) -> dict:
        return simulate(plan, c, target, keep_rows=False).summary()

    wide, narrow = simulated(at_b1), simulated(half)
    assert wide["cost"] > narrow["cost"] and wide["wall_s"] > narrow["wall_s"]
    calls = simulate(plan, at_b1, target).rows  # the vectors, then the rows: two PUTs
    assert [r["puts"] for r in calls] == [2] * 20
    assert [r["puts"] for r in simulate(plan, cal, target).rows] == [1] * 20
    with pytest.raises(CalibrationError, match="'b3' is not a block boundary"):
        for_output(cal, "embeddings", "b3")
    with pytest.raises(CalibrationError, match="predates embeddings"):
        for_output(cal, "embeddings")  # the model output's width: not in this calibration
    whole = for_output({**cal, "output_bytes_per_image": 4000}, "embeddings")
    assert whole["blocks"][-1]["bytes_out_per_image"] == 4000 + EMBEDDING_ROW_BYTES
    assert len(whole["blocks"]) == 4


@pytest.mark.e2e
def test_cli_plans_and_runs_an_embeddings_job(tmp_path, tiny_plan, photos):
    """`plan --output embeddings --tensor NAME` writes a plan that prices it, and
    `run --plan` runs that job from a folder of images, packed at the plan's size."""
    root, _ = tiny_plan
    cal = json.loads((root / "cal.json").read_text())
    tensor = cal["boundaries"][-1]
    res = runner.invoke(app, ["plan", str(root / "tiny.onnx"), "--images", "61",
                              "--deadline", "3600", "--target", "local",
                              "--calibration", str(root / "cal.json"), "--out",
                              str(tmp_path / "plan.json"), "--memory-step", "256",
                              "--output", "embeddings", "--tensor", tensor])
    assert res.exit_code == 0, res.output
    assert f"chosen plan (fp32, embeddings of {tensor})" in res.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["output"] == {"kind": "embeddings", "tensor": tensor, "dtype": "float32",
                              "vector_bytes_per_image": cal["blocks"][-2][
                                  "bytes_out_per_image"]}
    res = runner.invoke(app, ["run", "--plan", str(tmp_path / "plan.json"), "--input",
                              str(photos), "--store", str(tmp_path / "st"), "--job", "p"])
    assert res.exit_code == 1, res.output  # the broken image
    assert "embeddings: " in res.output and "served 60 images; failed images 1" in res.output
    spec = json.loads((tmp_path / "st" / "p" / "job.json").read_text())
    assert (spec["output"], spec["tensor"]) == ("embeddings", tensor)
    per = plan["images_per_record"]
    assert len(list((tmp_path / "st" / "p" / "embeddings").glob("*.npy"))) == -(-61 // per)
    res = runner.invoke(app, ["run", "--plan", str(tmp_path / "plan.json"), "--input",
                              str(photos), "--store", str(tmp_path / "st"), "--output",
                              "predictions"])
    assert res.exit_code == 2 and "differs from the plan's (embeddings)" in res.output


def test_partition_list_names_the_output_as_a_candidate(tiny_model_path):
    res = runner.invoke(app, ["partition", tiny_model_path, "--list"])
    assert res.exit_code == 0, res.output
    assert "Softmax (output)" in res.output and "--tensor for --output embeddings" in (
        res.output.replace("\n", " "))
