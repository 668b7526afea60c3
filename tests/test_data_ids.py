"""Ids that join back (issue 23, item 4): every prediction row carries the source's id of
its image, and `export` a column of it. A folder's images: the file path, as the filename;
a TFRecord's: its `image/source_id` feature when it has one (as TensorFlow's detection
shards carry it, a string or a number), else the filename; a shard's: the sample key (in
test_data_webdataset.py). Rows and metas written before ids read with the filename."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from datakit import encode, picture
from helpers import rows_of, run_local

from serveless.data.export import export
from serveless.data.predictions import parse_meta, row_id
from serveless.data.records import (
    FEATURE_ENCODED,
    FEATURE_FILENAME,
    ExamplePB,
    decode_example,
    frame,
)
from serveless.driver.prepare import prepare_job
from serveless.store import Store


def tf_example(image: bytes, filename: str, source_id: str | int | None) -> bytes:
    """A tf.train.Example as TensorFlow's tools build one, feature by feature (not through
    our encoder): image/source_id a bytes feature, or an int64 one."""
    msg = ExamplePB()
    feature = msg.features.feature
    feature[FEATURE_ENCODED].bytes_list.value.append(image)
    feature[FEATURE_FILENAME].bytes_list.value.append(filename.encode())
    feature["image/format"].bytes_list.value.append(b"jpeg")
    if isinstance(source_id, int):
        feature["image/source_id"].int64_list.value.append(source_id)
    elif source_id is not None:
        feature["image/source_id"].bytes_list.value.append(source_id.encode())
    return msg.SerializeToString()


def test_source_id_is_read_as_tensorflow_writes_it():
    img = encode(picture(1), "JPEG")
    assert decode_example(tf_example(img, "a.jpg", "coco/000042")).id == "coco/000042"
    assert decode_example(tf_example(img, "a.jpg", 1234567890123)).id == 1234567890123
    assert decode_example(tf_example(img, "a.jpg", None)).id is None


def test_rows_and_metas_from_before_ids_read_with_the_filename():
    assert row_id({"filename": "cat/1.jpg"}) == "cat/1.jpg"
    assert row_id({"filename": "cat/1.jpg", "id": 7}) == 7
    old = {"n": 1, "filenames": ["a.jpg"], "labels": [-1], "errors": {}}
    assert parse_meta(json.dumps(old).encode(), "m") == old
    with pytest.raises(ValueError, match="ids"):
        parse_meta(json.dumps({**old, "ids": [True]}).encode(), "m")
    with pytest.raises(ValueError, match="ids"):
        parse_meta(json.dumps({**old, "ids": ["a", "b"]}).encode(), "m")


@pytest.mark.e2e
def test_ids_of_a_folder_and_of_tfrecords_in_rows_and_exports(tmp_path, tiny_model_path):
    folder = tmp_path / "photos" / "cats"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"c{i}.jpg").write_bytes(encode(picture(i), "JPEG"))
    records = tmp_path / "records"
    records.mkdir()
    ids = ["coco/000001", None, 42]
    (records / "r.tfrecord").write_bytes(b"".join(
        frame(tf_example(encode(picture(10 + i), "JPEG"), f"img{i}.jpg", sid))
        for i, sid in enumerate(ids)))
    (records / "n.tfrecord").write_bytes(b"".join(
        frame(tf_example(encode(picture(20 + i), "JPEG"), f"n{i}.jpg", 100 + i))
        for i in range(2)))
    store = Store(str(tmp_path / "store"))
    run_local(store, prepare_job(store, "folder", tiny_model_path,
                                 records=str(tmp_path / "photos")))
    run_local(store, prepare_job(store, "tf", tiny_model_path, records=str(records)))
    assert [r["id"] for r in rows_of(store, "folder")] == [f"cats/c{i}.jpg" for i in range(3)]
    assert [r["id"] for r in rows_of(store, "folder")] == [
        r["filename"] for r in rows_of(store, "folder")]
    assert [r["id"] for r in rows_of(store, "tf")] == [100, 101, "coco/000001", "img1.jpg", 42]
    # in two stages, the ids travel through stage 0's meta in the store
    run_local(store, prepare_job(store, "tf2", tiny_model_path, cuts="r1", records=str(records)))
    assert [r["id"] for r in rows_of(store, "tf2")] == [100, 101, "coco/000001", "img1.jpg", 42]

    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("jsonl", "csv", "parquet"):
        export(store, "tf", fmt, str(out / f"tf.{fmt}"))
    lines = [json.loads(x) for x in (out / "tf.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [100, 101, "coco/000001", "img1.jpg", 42]
    header, *rows = (out / "tf.csv").read_text().splitlines()
    assert header.split(",")[:4] == ["record", "index", "filename", "id"]
    assert [r.split(",")[3] for r in rows] == ["100", "101", "coco/000001", "img1.jpg", "42"]
    table = pq.read_table(out / "tf.parquet")
    assert table.column("id").to_pylist() == ["100", "101", "coco/000001", "img1.jpg", "42"]

    # numbers only: an integer column, which joins to a table's integer ids as it is
    export(store, "folder", "parquet", str(out / "folder.parquet"))
    assert pq.read_table(out / "folder.parquet").column("id").to_pylist() == [
        f"cats/c{i}.jpg" for i in range(3)]
    only_numbers = tmp_path / "numbers"
    only_numbers.mkdir()
    (only_numbers / "n.tfrecord").write_bytes((records / "n.tfrecord").read_bytes())
    run_local(store, prepare_job(store, "nums", tiny_model_path, records=str(only_numbers)))
    export(store, "nums", "parquet", str(out / "nums.parquet"))
    column = pq.read_table(out / "nums.parquet").column("id")
    assert str(column.type) == "int64" and column.to_pylist() == [100, 101]
