"""A job's results as one table (Parquet, CSV or JSONL), as Ray Data users write them.

One row per input image, in record then index order, with the same columns whatever the
format: record, index, filename, id (the source's id of the image, to join results back to
the user's table with: data/predictions.py), label, class_name, top5 (class ids),
top5_scores, scores (what the scores are: probs, softmax(logits), logits), error (the
reason an image failed, else null); with `with_scores`, also `all_scores` (the model's
whole output row, from the job's `scores/` objects, which `run --save-scores` writes).

An embeddings job (`run --output embeddings`) has no scores: its table is record, index,
filename, id, label, class_name, error and `embedding`, the image's vector (null for a
failed image). In Parquet that is a fixed-size list of float32: pyarrow reads it back as
one (`fixed_size_list<float>[D]`, from the Arrow schema pyarrow stores), DuckDB as a list
(`FLOAT[]`, Parquet having no fixed-size type; `embedding::FLOAT[D]` makes it an array for
`array_cosine_similarity`). float16 vectors are widened to float32, exactly, because
DuckDB reads no half floats.

The rows are read first (a few hundred bytes each); the vectors are then read and written
one record at a time, so an export of 100,000 AlexNet relu7 vectors (1.6 GB) holds one
record's 16 MB, not the job's, and never as Python lists in Parquet.

Parquet needs pyarrow, an optional dependency (`pip install 'serveless[parquet]'`): only the
driver exports, and the functions' runtime (a Lambda image) should not carry ~100 MB it
never uses; CSV and JSONL need nothing more.
"""

from __future__ import annotations

import csv
import io
import json
from typing import IO, Any

import numpy as np

from ..errors import ExportError, StoreError
from ..store import JobLayout, Store
from .predictions import prediction_keys, record_of, record_rows, row_id

FORMATS = ("parquet", "csv", "jsonl")
COLUMNS = ("record", "index", "filename", "id", "label", "class_name", "top5", "top5_scores",
           "scores", "error")
EMBEDDING_COLUMNS = ("record", "index", "filename", "id", "label", "class_name", "error",
                     "embedding")


def table_row(row: dict[str, Any], embeddings: bool = False) -> dict[str, Any]:
    """A stored row (JSONL in the store) as a row of the merged table, without its vector."""
    err = row.get("error")
    out = {
        "record": row["record"],
        "index": int(row["index"]),
        "filename": row.get("filename"),
        "id": row_id(row),
        "label": row.get("label"),
        "class_name": row.get("class_name"),
    }
    if not embeddings:
        out["top5"] = row.get("top5")
        out["top5_scores"] = row.get("probs") if "probs" in row else row.get("logits")
        out["scores"] = row.get("scores", "probs")
    out["error"] = err.get("message") if isinstance(err, dict) else err
    return out


def _job_spec(store: Store, job: str) -> dict[str, Any]:
    """job.json as data, read here rather than through the driver's JobSpec, so the data
    formats depend on no driver."""
    layout = JobLayout(job)
    try:
        spec = json.loads(store.get_bytes(layout.spec))
    except StoreError as exc:
        if not prediction_keys(store, job):
            raise ExportError(f"job {job!r} has no predictions in {store.url} (run it "
                              "first)") from exc
        raise ExportError(f"no job {job!r} in {store.url} (missing {layout.spec})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{store.path(layout.spec)} is not JSON ({exc})") from exc
    return spec if isinstance(spec, dict) else {}


def _vectors(store: Store, key: str, n: int, missing: str) -> np.ndarray:
    """One record's vectors (n × D), checked against its rows."""
    try:
        data = store.get_bytes(key)
    except StoreError as exc:
        raise ExportError(missing) from exc
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ExportError(f"{key}: not a .npy array ({exc})") from exc
    if arr.ndim < 1 or len(arr) != n:
        raise ExportError(f"{key}: {len(arr) if arr.ndim else 0} vectors for {n} rows")
    return arr.reshape(n, -1)


def export(store: Store, job: str, fmt: str, out: str, with_scores: bool = False,
           options: dict[str, Any] | None = None) -> int:
    """Write the job's table to `out` (a path or fsspec URL); returns the number of rows."""
    import fsspec

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    spec = _job_spec(store, job)
    embeddings = spec.get("output") == "embeddings"
    if with_scores and embeddings:
        raise ExportError(f"job {job!r} stored embeddings, not scores: its table has every "
                          "image's vector (the embedding column) without --with-scores")
    if with_scores and not spec.get("save_scores"):
        raise ExportError(f"job {job!r} was run without --save-scores; its whole score "
                          "vectors were not kept")
    keys = prediction_keys(store, job)
    if not keys:
        raise ExportError(f"job {job!r} has no predictions in {store.url} (run it first)")
    layout = JobLayout(job)
    records = []
    for key in keys:
        rows = sorted(record_rows(store, key), key=lambda r: int(r["index"]))
        records.append((record_of(key), [table_row(r, embeddings) for r in rows]))
    columns = list(EMBEDDING_COLUMNS if embeddings else COLUMNS)
    vector = "embedding" if embeddings else ("all_scores" if with_scores else None)
    if with_scores:
        columns.append("all_scores")

    def vectors(record: str, n: int) -> np.ndarray:
        if embeddings:
            return _vectors(store, layout.embeddings(record), n,
                            f"job {job!r} has rows but no embeddings for record {record!r}")
        return _vectors(store, layout.scores(record), n,
                        f"job {job!r} has no saved scores for record {record!r}; run it "
                        "with --save-scores to export --with-scores")

    writer_of = {"parquet": _ParquetTable, "csv": _CsvTable, "jsonl": _JsonlTable}[fmt]
    numeric = all(isinstance(r["id"], int) for _, rows in records for r in rows)
    total = 0
    with fsspec.open(out, "wb", **(options or {})) as f:
        table = writer_of(f, columns, vector, numeric, embeddings)
        for record, rows in records:
            table.write(rows, vectors(record, len(rows)) if vector else None)
            total += len(rows)
        table.close()
    return total


def _lists(rows: list[dict[str, Any]], vector: str | None,
           values: np.ndarray | None) -> list[dict[str, Any]]:
    """Rows with their vectors as lists of floats (null for a failed image)."""
    if vector is None or values is None:
        return rows
    return [{**r, vector: None if r["error"] else [float(v) for v in values[i]]}
            for i, r in enumerate(rows)]


class _JsonlTable:
    def __init__(self, f: IO[bytes], columns: list[str], vector: str | None, numeric: bool,
                 embeddings: bool):
        self.f, self.vector = f, vector

    def write(self, rows: list[dict[str, Any]], values: np.ndarray | None) -> None:
        self.f.write("".join(json.dumps(r) + "\n"
                             for r in _lists(rows, self.vector, values)).encode())

    def close(self) -> None:
        pass


class _CsvTable(_JsonlTable):
    """Lists as JSON text ("[671, 239]"), nulls as empty cells."""

    def __init__(self, f: IO[bytes], columns: list[str], vector: str | None, numeric: bool,
                 embeddings: bool):
        super().__init__(f, columns, vector, numeric, embeddings)
        self.text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        self.csv = csv.DictWriter(self.text, fieldnames=columns, lineterminator="\n")
        self.csv.writeheader()

    def write(self, rows: list[dict[str, Any]], values: np.ndarray | None) -> None:
        for r in _lists(rows, self.vector, values):
            self.csv.writerow({k: json.dumps(v) if isinstance(v, list)
                               else ("" if v is None else v) for k, v in r.items()})

    def close(self) -> None:
        self.text.flush()
        self.text.detach()  # the file is fsspec's to close


class _ParquetTable:
    """One row group per record. ids are numbers when every one is (a table's integer ids
    join as they are), else text."""

    def __init__(self, f: IO[bytes], columns: list[str], vector: str | None, numeric: bool,
                 embeddings: bool):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ExportError("Parquet needs pyarrow: pip install 'serveless[parquet]'") \
                from exc
        self.pa, self.pq, self.f = pa, pq, f
        self.vector, self.numeric, self.embeddings = vector, numeric, embeddings
        types = {"record": pa.string(), "index": pa.int64(), "filename": pa.string(),
                 "id": pa.int64() if numeric else pa.string(), "label": pa.int64(),
                 "class_name": pa.string(), "top5": pa.list_(pa.int64()),
                 "top5_scores": pa.list_(pa.float64()), "scores": pa.string(),
                 "error": pa.string(), "all_scores": pa.list_(pa.float32())}
        self.fields = [(c, types[c]) for c in columns if c != "embedding"]
        self.writer: Any = None

    def write(self, rows: list[dict[str, Any]], values: np.ndarray | None) -> None:
        pa = self.pa
        if not self.numeric:
            rows = [{**r, "id": None if r["id"] is None else str(r["id"])} for r in rows]
        if self.embeddings:
            scalar = pa.Table.from_pylist(rows, schema=pa.schema(self.fields))
            table = scalar.append_column("embedding", self._fixed(rows, values))
        else:
            table = pa.Table.from_pylist(_lists(rows, self.vector, values),
                                         schema=pa.schema(self.fields))
        if self.writer is None:
            self.writer = self.pq.ParquetWriter(self.f, table.schema)
        self.writer.write_table(table)

    def _fixed(self, rows: list[dict[str, Any]], values: np.ndarray | None) -> Any:
        """The vectors as a fixed-size list column built from the array's buffer, nulls
        where an image failed."""
        pa = self.pa
        assert values is not None
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        valid = np.array([r["error"] is None for r in rows], dtype=bool)
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
        width = values.shape[1] if values.ndim == 2 else 0
        return pa.Array.from_buffers(pa.list_(pa.float32(), width), len(rows),
                                     [bitmap], children=[flat])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
