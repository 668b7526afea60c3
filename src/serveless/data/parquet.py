"""Parquet image tables, read on the driver and packed into records by row groups.

Many image sets are kept as Parquet tables with an image column: Hugging Face `datasets`
writes its `Image` feature as a struct of `bytes` and `path`, and its `ClassLabel`'s names
into the schema's `huggingface` metadata; a table written with plain pyarrow has a binary
column. A table is not a record (its images are column chunks, not entries a function can
stream without pyarrow), so the driver packs it into TFRecords, reading one batch of a
row group at a time, never the whole file: functions keep needing numpy, Pillow and
onnxruntime only, and pyarrow stays the driver's optional dependency (`serveless[parquet]`).

Columns are chosen by the user (`--image-column`, `--label-column`, `--id-column`) or found:
the image column is the one binary column or struct with a binary `bytes` field (several
is a question, asked before anything runs); the label is the one ClassLabel column, else an
integer column named `label`; the id is the `--id-column` value (an id on two rows, in one
table or across them, is refused before anything is written), else the row's index in
its file. A null image (or an image kept by path only) is an error row naming its row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from ..errors import SourceError
from .records import DUPLICATE_IDS, Example

__all__ = ["PARQUET_MAGIC", "TableColumns", "check_tables", "is_parquet_head", "iter_table",
           "table_columns", "table_examples"]

PARQUET_MAGIC = b"PAR1"
BATCH_ROWS = 64
"""Rows read at a time: with ~100 KB images, a few MB in memory whatever the table's size."""


def is_parquet_head(head: bytes) -> bool:
    """Whether a file starts like a Parquet file (its magic; the footer is checked on open)."""
    return head[:4] == PARQUET_MAGIC


@dataclass(frozen=True)
class TableColumns:
    """The columns a table's images, labels and ids come from, and its class names."""

    image: str
    struct: bool  # the image column is a struct (Hugging Face's Image: bytes, path)
    label: str | None = None
    id: str | None = None
    classes: tuple[str, ...] | None = None  # a ClassLabel's names, index = label


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise SourceError("Parquet input needs pyarrow on the driver: "
                          "pip install 'serveless[parquet]'") from exc
    return pyarrow


def _image_like(pa: Any, field: Any) -> bool | None:
    """True for a struct with a binary `bytes` field, False for a binary column, None for
    anything else."""
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if any(t(field.type) for t in binary):
        return False
    if pa.types.is_struct(field.type):
        inner = field.type.get_field_index("bytes")
        if inner >= 0 and any(t(field.type.field(inner).type) for t in binary):
            return True
    return None


def _class_labels(schema: Any) -> dict[str, list[str]]:
    """ClassLabel columns and their names, from the `huggingface` schema metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {name: [str(n) for n in spec["names"]] for name, spec in features.items()
            if isinstance(spec, dict) and spec.get("_type") == "ClassLabel"
            and isinstance(spec.get("names"), list)}


def table_columns(f: IO[bytes], where: str, image: str | None = None,
                  label: str | None = None, id: str | None = None) -> tuple[TableColumns, int]:
    """(the columns to read, the number of rows) of a table, from its footer alone; every
    mistake is a SourceError naming the file and the column."""
    pa = _pyarrow()
    try:
        meta = pa.parquet.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{where}: not a readable Parquet file: {exc}") from None
    schema = meta.schema_arrow
    names = schema.names
    labels = _class_labels(schema)

    def field(name: str, flag: str) -> Any:
        if name not in names:
            raise SourceError(f"{where}: no column {name!r} ({flag}); it has "
                              f"{', '.join(names)}")
        return schema.field(name)

    if image is not None:
        struct = _image_like(pa, field(image, "--image-column"))
        if struct is None:
            raise SourceError(f"{where}: column {image!r} holds {schema.field(image).type}, "
                              "not images (a binary column, or a struct with 'bytes')")
    else:
        found = [(n, s) for n in names if (s := _image_like(pa, schema.field(n))) is not None]
        if len(found) != 1:
            raise SourceError(f"{where}: " + (
                f"{len(found)} image-like columns ({', '.join(n for n, _ in found)}); "
                "choose one with --image-column" if found else
                "no image column (a binary column, or a struct with 'bytes'); "
                f"it has {', '.join(names)}"))
        image, struct = found[0]
    if label is not None:
        if not pa.types.is_integer(field(label, "--label-column").type):
            raise SourceError(f"{where}: column {label!r} holds {schema.field(label).type}, "
                              "not integer labels")
    elif len(labels) == 1:
        label = next(iter(labels))
    elif "label" in names and pa.types.is_integer(schema.field("label").type):
        label = "label"
    if id is not None:
        kind = field(id, "--id-column").type
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind)
                or pa.types.is_large_string(kind)):
            raise SourceError(f"{where}: column {id!r} holds {kind}, not ids (integers or "
                              "text)")
    classes = tuple(labels[label]) if label in labels else None
    return TableColumns(image, bool(struct), label, id, classes), meta.metadata.num_rows


def iter_table(f: IO[bytes], where: str, cols: TableColumns, name: str) -> Iterator[Example]:
    """The rows of a table as Examples, a batch of a row group at a time: the image's bytes
    as they are, `name#row` (or the struct's `path`) as filename, the label (-1 when null
    or negative) and the id; a row without image bytes is an Example with `error` set."""
    pa = _pyarrow()
    wanted = [c for c in (cols.image, cols.label, cols.id) if c is not None]
    try:
        table = pa.parquet.ParquetFile(f)
        row = 0
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            images = batch.column(cols.image)
            paths = None
            if cols.struct:
                paths = images.field("path") if images.type.get_field_index("path") >= 0 \
                    else None
                images = images.field("bytes").to_pylist()
                nulls = batch.column(cols.image).is_null().to_pylist()
                images = [None if n else b for b, n in zip(images, nulls, strict=True)]
            else:
                images = images.to_pylist()
            paths = paths.to_pylist() if paths is not None else [None] * len(images)
            labels = (batch.column(cols.label).to_pylist() if cols.label
                      else [None] * len(images))
            ids = batch.column(cols.id).to_pylist() if cols.id else [None] * len(images)
            for data, path, label, ident in zip(images, paths, labels, ids, strict=True):
                filename = path if isinstance(path, str) and path else f"{name}#{row}"
                label = label if isinstance(label, int) and label >= 0 else -1
                ident = row if cols.id is None else ident
                if data is None:
                    why = (f"row {row} of {name}: no image bytes (null"
                           + (f"; its path is {path!r}, not in the table)" if path else ")"))
                    yield Example(b"", filename, label, id=ident, error=why)
                else:
                    yield Example(data, filename, label, id=ident)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{where}: cannot read the table: {exc}") from None


def check_tables(tables: Sequence[Any], image: str | None = None, label: str | None = None,
                 id: str | None = None) -> tuple[list[TableColumns], int, list[str] | None]:
    """(each table's columns, rows in all, the class names) of a job's tables (files with
    `open()`, `shown` and `rel`, as sources.InputFile), from their footers, before anything
    is written. Tables whose ClassLabels name different classes are refused: one job has
    one labels.json."""
    columns, rows = [], 0
    classes: tuple[str, ...] | None = None
    for f in tables:
        with f.open() as fh:
            cols, n = table_columns(fh, f.shown, image, label, id)
        if cols.classes is not None:
            if classes is not None and cols.classes != classes:
                raise SourceError(f"{f.shown}: its classes ({', '.join(cols.classes[:5])}…) "
                                  "differ from the other tables'; a job has one set")
            classes = cols.classes
        columns.append(cols)
        rows += n
    if id is not None:
        _refuse_repeated_ids(tables, id)
    return columns, rows, list(classes) if classes is not None else None


def _refuse_repeated_ids(tables: Sequence[Any], id: str) -> None:
    """A SourceError naming the first id that repeats, within a table or across them, and
    the two rows it is on. Reads the id column alone (a column of a million ids is a few
    MB). Integer ids and text ids never equal each other, as in a manifest."""
    pa = _pyarrow()
    import pyarrow.compute as pc

    groups: dict[bool, list[tuple[Any, Any]]] = {}  # integer ids or text ids: (file, ids)
    for f in tables:
        with f.open() as fh:
            try:
                ids = pa.parquet.read_table(fh, columns=[id]).column(0)
                integer = pa.types.is_integer(ids.type)  # a uint64 past 2**63 cannot cast
                ids = ids.cast(pa.int64() if integer else pa.large_string())
            except (pa.ArrowException, OSError) as exc:
                raise SourceError(f"{f.shown}: cannot read column {id!r}: {exc}") from None
        groups.setdefault(integer, []).append((f, ids))
    for found in groups.values():
        both = pa.chunked_array([c for _, ids in found for c in ids.chunks],
                                type=found[0][1].type)
        counts = pc.value_counts(both)
        repeated = counts.filter(pc.and_(pc.greater(counts.field("counts"), 1),
                                         pc.is_valid(counts.field("values"))))
        if len(repeated) == 0:
            continue
        value = repeated.field("values")[0]
        first, second = pc.indices_nonzero(
            pc.fill_null(pc.equal(both, value), False)).to_pylist()[:2]
        files = [f.shown for f, _ in found]
        ends = np.cumsum([len(ids) for _, ids in found])
        raise SourceError(f"id {value.as_py()!r} in column {id!r} is on "
                          f"{_row_of(files, ends, first)} and {_row_of(files, ends, second)}; "
                          f"{DUPLICATE_IDS}")


def _row_of(files: list[str], ends: Any, i: int) -> str:
    """'row R of FILE' for row `i` of tables laid end to end (`ends`: their cumulative
    lengths)."""
    t = int(np.searchsorted(ends, i, side="right"))
    return f"row {i - (int(ends[t - 1]) if t else 0)} of {files[t]}"


def table_examples(tables: Sequence[Any], columns: Sequence[TableColumns]
                   ) -> Iterator[Example]:
    """Every row of every table, in order, as Examples (one batch in memory at a time)."""
    for f, cols in zip(tables, columns, strict=True):
        with f.open() as fh:
            yield from iter_table(fh, f.shown, cols, f.rel)
