"""A job's predictions as one table (Parquet, CSV or JSONL), as Ray Data users write them.

One row per input image, in record then index order, with the same columns whatever the
format: record, index, filename, id (the source's id of the image, to join results back to
the user's table with: data/predictions.py), label, class_name, top5 (class ids),
top5_scores, scores (what the scores are: probs, softmax(logits), logits), error (the
reason an image failed, else null); with `with_scores`, also `all_scores` (the model's
whole output row, from the job's `scores/` objects, which `run --save-scores` writes).

Parquet needs pyarrow, an optional dependency (`pip install 'serveless[parquet]'`): only the
driver exports, and the functions' runtime (a Lambda image) should not carry ~100 MB it
never uses; CSV and JSONL need nothing more.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ExportError, StoreError
from ..store import JobLayout, Store
from .predictions import prediction_keys, record_of, record_rows, row_id

FORMATS = ("parquet", "csv", "jsonl")
COLUMNS = ("record", "index", "filename", "id", "label", "class_name", "top5", "top5_scores",
           "scores", "error")


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A prediction row (JSONL in the store) as a row of the merged table."""
    err = row.get("error")
    values = row.get("probs") if "probs" in row else row.get("logits")
    return {
        "record": row["record"],
        "index": int(row["index"]),
        "filename": row.get("filename"),
        "id": row_id(row),
        "label": row.get("label"),
        "class_name": row.get("class_name"),
        "top5": row.get("top5"),
        "top5_scores": values,
        "scores": row.get("scores", "probs"),
        "error": err.get("message") if isinstance(err, dict) else err,
    }


def iter_rows(store: Store, job: str, with_scores: bool = False) -> Iterator[dict[str, Any]]:
    """Every image's table row, record by record (records in name order)."""
    layout = JobLayout(job)
    keys = prediction_keys(store, job)
    if not keys:
        raise ExportError(f"job {job!r} has no predictions in {store.url} (run it first)")
    for key in keys:
        rows = record_rows(store, key)
        rows.sort(key=lambda r: int(r["index"]))
        scores = _scores(store, layout, key, len(rows)) if with_scores else None
        for i, row in enumerate(rows):
            out = table_row(row)
            if scores is not None:
                out["all_scores"] = None if out["error"] else [float(v) for v in scores[i]]
            yield out


def _saved_scores(store: Store, job: str) -> bool:
    """Whether the job kept its score vectors (run --save-scores): job.json's flag, read here
    rather than through the driver's JobSpec, so the data formats depend on no driver."""
    layout = JobLayout(job)
    try:
        spec = json.loads(store.get_bytes(layout.spec))
    except StoreError as exc:
        raise ExportError(f"no job {job!r} in {store.url} (missing {layout.spec})") from exc
    return bool(spec.get("save_scores"))


def _scores(store: Store, layout: JobLayout, pred_key: str, n: int) -> np.ndarray:
    record = record_of(pred_key)
    key = layout.scores(record)
    try:
        data = store.get_bytes(key)
    except StoreError as exc:
        raise ExportError(f"job {layout.job!r} has no saved scores for record {record!r}; "
                          "run it with --save-scores to export --with-scores") from exc
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if len(arr) != n:
        raise ExportError(f"{key}: {len(arr)} score rows for {n} predictions")
    return arr.reshape(n, -1)


def export(store: Store, job: str, fmt: str, out: str, with_scores: bool = False,
           options: dict[str, Any] | None = None) -> int:
    """Write the job's table to `out` (a path or fsspec URL); returns the number of rows."""
    import fsspec

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if with_scores and not _saved_scores(store, job):
        raise ExportError(f"job {job!r} was run without --save-scores; its whole score "
                          "vectors were not kept")
    rows = list(iter_rows(store, job, with_scores))
    if fmt == "parquet":
        data = _parquet(rows, with_scores)
    elif fmt == "csv":
        data = _csv(rows)
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with fsspec.open(out, "wb", **(options or {})) as f:
        f.write(data)
    return len(rows)


def _csv(rows: list[dict[str, Any]]) -> bytes:
    """Lists as JSON text ("[671, 239]"), nulls as empty cells."""
    buf = io.StringIO()
    names = list(rows[0]) if rows else list(COLUMNS)
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else ("" if v is None else v)
                         for k, v in r.items()})
    return buf.getvalue().encode()


def _parquet(rows: list[dict[str, Any]], with_scores: bool) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError("Parquet needs pyarrow: pip install 'serveless[parquet]'") from exc
    # ids are numbers when every one is (a table's integer ids join as they are), else text
    numeric = bool(rows) and all(isinstance(r["id"], int) for r in rows)
    if not numeric:
        rows = [{**r, "id": None if r["id"] is None else str(r["id"])} for r in rows]
    fields = [("record", pa.string()), ("index", pa.int64()), ("filename", pa.string()),
              ("id", pa.int64() if numeric else pa.string()), ("label", pa.int64()),
              ("class_name", pa.string()),
              ("top5", pa.list_(pa.int64())), ("top5_scores", pa.list_(pa.float64())),
              ("scores", pa.string()), ("error", pa.string())]
    if with_scores:
        fields.append(("all_scores", pa.list_(pa.float32())))
    schema = pa.schema(fields)
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
