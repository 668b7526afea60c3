"""Parquet image tables as input (issue 23, item 2), written by the libraries users write
them with: Hugging Face `datasets` (an Image feature, a ClassLabel) and plain pyarrow (a
binary column). Each is packed into records by the driver; the rows carry the table's ids
(the --id-column, else the row index) and labels (class names from the ClassLabel), score
as the same images served from a folder, and a null or broken image is an error row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import rows_of, run_local

from serveless.data.sources import scan_inputs
from serveless.driver.prepare import prepare_job
from serveless.errors import JobError, SourceError
from serveless.store import Store

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def photos(image_dir) -> list[tuple[str, int, bytes]]:
    files = sorted(image_dir.rglob("*.jpg"), key=lambda p: p.relative_to(image_dir).parts)
    return [(p.stem, int(p.parent.name.split("_")[-1]), p.read_bytes()) for p in files]


def hf_table(path: Path, photos: list[tuple[str, int, bytes]], rows_per_group: int) -> Path:
    """A table as `datasets` writes one: Image feature, ClassLabel, an id column."""
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": data, "path": f"{stem}.jpg"} for stem, _, data in photos],
        "label": [label for _, label, _ in photos],
        "uid": [f"uid-{stem}" for stem, _, _ in photos],
    })
    ds = ds.cast_column("image", datasets.Image())
    ds = ds.cast_column("label", datasets.ClassLabel(names=["apple", "bear", "cloud"]))
    ds.to_parquet(str(path), batch_size=rows_per_group)
    return path


@pytest.mark.e2e
def test_a_datasets_table_in_row_groups(tmp_path, photos, folder_rows, tiny_model_path):
    src = tmp_path / "in"
    src.mkdir()
    table = hf_table(src / "train.parquet", photos, rows_per_group=16)
    assert pq.ParquetFile(table).metadata.num_row_groups > 1
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "hf", tiny_model_path, records=str(src), per_record=25,
                       columns={"id": "uid"})
    assert spec.record_format == "tfrecord" and spec.classes
    assert len(spec.records) == 3  # 60 rows in records of 25
    run_local(store, spec)
    rows = rows_of(store, "hf")
    assert [r["id"] for r in rows] == [f"uid-{stem}" for stem, _, _ in photos]
    assert [r["filename"] for r in rows] == [f"{stem}.jpg" for stem, _, _ in photos]
    names = ["apple", "bear", "cloud"]
    for r, (stem, label, _) in zip(rows, photos, strict=True):
        ref = folder_rows[stem]
        assert r["error"] is None and r["label"] == label
        assert r["class_name"] == names[label]
        assert r["top5"] == ref["top5"]
        np.testing.assert_allclose(r["probs"], ref["probs"], atol=1e-6)


@pytest.mark.e2e
def test_a_pyarrow_table_with_null_and_broken_images(tmp_path, photos, tiny_model_path):
    images = [data for _, _, data in photos[:6]]
    images[2] = None
    images[4] = b"\xff\xd8\xff" + b"\x00" * 40
    table = pa.table({"note": [f"n{i}" for i in range(6)],
                      "jpeg": pa.array(images, pa.binary()),
                      "y": pa.array([7, 8, 9, None, -1, 3], pa.int32())})
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(table, src / "part-0", row_group_size=4)  # no .parquet: found by content
    store = Store(str(tmp_path / "store"))
    spec = prepare_job(store, "pa", tiny_model_path, records=str(src), columns={"label": "y"})
    run_local(store, spec, image_errors=2)
    rows = rows_of(store, "pa")
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["filename"] for r in rows] == [f"part-0#{i}" for i in range(6)]
    assert [r["label"] for r in rows] == [7, 8, 9, None, None, 3]
    errors = {r["id"]: r["error"]["message"] for r in rows if r["error"]}
    assert errors.keys() == {2, 4}
    assert errors[2] == "row 2 of part-0: no image bytes (null)"
    assert "JPEG" in errors[4]
    assert all(r["top5"] for r in rows if not r["error"])


def test_columns_are_checked_before_anything_is_written(tmp_path, photos, tiny_model_path):
    src = tmp_path / "in"
    src.mkdir()
    data = [d for _, _, d in photos[:3]]
    pq.write_table(pa.table({"a": pa.array(data, pa.binary()),
                             "b": pa.array(data, pa.large_binary()),
                             "c": ["x", "y", "z"]}), src / "t.parquet")
    store = Store(str(tmp_path / "store"))
    with pytest.raises(JobError, match=r"t\.parquet: 2 image-like columns \(a, b\); choose"):
        prepare_job(store, "j", tiny_model_path, records=str(src))
    with pytest.raises(JobError, match=r"column 'c' holds string, not images"):
        prepare_job(store, "j", tiny_model_path, records=str(src), columns={"image": "c"})
    with pytest.raises(JobError, match=r"no column 'z' \(--id-column\)"):
        prepare_job(store, "j", tiny_model_path, records=str(src),
                    columns={"image": "a", "id": "z"})
    with pytest.raises(JobError, match=r"column 'c' holds string, not integer labels"):
        prepare_job(store, "j", tiny_model_path, records=str(src),
                    columns={"image": "a", "label": "c"})
    assert not (tmp_path / "store" / "j").exists()
    (src / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"fake\.parquet: not a Parquet file"):
        scan_inputs(str(src))


def test_an_id_on_two_rows_is_refused_naming_both(tmp_path, photos, tiny_model_path):
    """Ids join results back: one that repeats, in a table or across two (written with
    pyarrow, as users write them), is refused before anything is written, naming the rows;
    the same ids, each once, are a job."""
    src = tmp_path / "in"
    src.mkdir()
    data = [d for _, _, d in photos[:4]]
    pq.write_table(pa.table({"img": data[:2], "uid": ["a", "b"]}), src / "p0.parquet")
    pq.write_table(pa.table({"img": data[2:], "uid": ["c", "b"]}), src / "p1.parquet")
    store = Store(str(tmp_path / "store"))
    with pytest.raises(JobError, match=r"id 'b' in column 'uid' is on row 1 of \S*p0\.parquet "
                                       r"and row 1 of \S*p1\.parquet; an id joins"):
        prepare_job(store, "j", tiny_model_path, records=str(src), columns={"id": "uid"})
    pq.write_table(pa.table({"img": data[2:], "uid": pa.array([5, 5], pa.int32())}),
                   src / "p1.parquet")  # integers: never equal to text ids
    with pytest.raises(JobError, match=r"id 5 in column 'uid' is on row 0 of \S*p1\.parquet "
                                       r"and row 1 of \S*p1\.parquet"):
        prepare_job(store, "j", tiny_model_path, records=str(src), columns={"id": "uid"})
    assert not (tmp_path / "store" / "j").exists()
    pq.write_table(pa.table({"img": data[2:], "uid": ["c", "d"]}), src / "p1.parquet")
    spec = prepare_job(store, "j", tiny_model_path, records=str(src), columns={"id": "uid"})
    run_local(store, spec)
    assert sorted(r["id"] for r in rows_of(store, "j")) == ["a", "b", "c", "d"]


def test_a_datasets_table_with_an_image_missing_or_kept_by_path(tmp_path, photos):
    """A null Image in a `datasets` table, and an image kept by path only (its bytes not in
    the table, as a struct column written with pyarrow may have it), are Examples with an
    error naming their row; the others carry their bytes."""
    from serveless.data.parquet import iter_table, table_columns

    data = photos[0][2]
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": data, "path": "a.jpg"}, None, {"bytes": data, "path": None}],
        "label": [0, 1, None]})
    ds = ds.cast_column("image", datasets.Image())
    ds = ds.cast_column("label", datasets.ClassLabel(names=["x", "y"]))
    path = tmp_path / "t.parquet"
    ds.to_parquet(str(path))
    with open(path, "rb") as f:
        cols, rows = table_columns(f, str(path))
    assert (cols.image, cols.struct, cols.label, cols.id, cols.classes, rows) == (
        "image", True, "label", None, ("x", "y"), 3)
    with open(path, "rb") as f:
        examples = list(iter_table(f, str(path), cols, "t.parquet"))
    assert [(e.filename, e.label, e.id) for e in examples] == [
        ("a.jpg", 0, 0), ("t.parquet#1", 1, 1), ("t.parquet#2", -1, 2)]
    assert [e.error for e in examples] == ["", "row 1 of t.parquet: no image bytes (null)", ""]
    assert bytes(examples[0].encoded) == data and bytes(examples[2].encoded) == data

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"img": pa.array([{"bytes": None, "path": "/data/c.jpg"},
                                              {"bytes": data, "path": "d.jpg"}], struct)}),
                   tmp_path / "p.parquet")
    with open(tmp_path / "p.parquet", "rb") as f:
        cols, _ = table_columns(f, "p.parquet")
        f.seek(0)
        examples = list(iter_table(f, "p.parquet", cols, "p.parquet"))
    assert [(e.filename, e.error) for e in examples] == [
        ("/data/c.jpg", "row 0 of p.parquet: no image bytes (null; its path is "
                        "'/data/c.jpg', not in the table)"), ("d.jpg", "")]
