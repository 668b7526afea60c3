"""Predictions: one row per input image, the format the last stage writes and every reader
reads (the summary's accuracy, `jobs`, `export`, the tests).

A job's predictions are `<job>/predictions/<record>.jsonl`, one JSON object per line:

    {"record", "index", "filename", "id", "label", ["class_name",] "top5",
     "probs" | "logits", "scores", "error"}

`id` is the source's own id for the image, the key a user joins results back to their
table with: a WebDataset sample's key, a TFRecord's `image/source_id` when it has one, else
the image's filename (a folder's file path, as packed). Rows of jobs from before ids had
none; their readers take the filename (`row_id`).

An embeddings job (`run --output embeddings`) writes the same rows without scores
(`embedding_row`: `"output": "embeddings"`, no `top5`), and every image's vector, in row
order, to `<job>/embeddings/<record>.npy`.

`scores` says what the values are: `probs` (the model ends in a softmax), `softmax(logits)`
(the function applied it), or `logits`. A failed image has its row too, with `top5` and the
values null and `error` set: nothing is lost silently. The row is built here
(`prediction_row`) and read here (`read_predictions`, `record_rows`, `accuracy`), so the
writer and its readers cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..store import JobLayout, Store

TOP_K = 5
SCORES = ("probs", "softmax(logits)", "logits")
"""What a row's values are: probabilities, the function's softmax of logits, or logits."""
OUTPUTS = ("predictions", "embeddings")
"""What a job's last stage stores: a row of top-5 scores per image, or a row per image and
its vector (`embedding_row`)."""


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (logits of 15 or 1000 must not overflow)."""
    z = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def prediction_row(
    record: str, index: int, filename: str, label: int, top: np.ndarray | None,
    values: np.ndarray | None, error: dict[str, str] | None, scores: str = "probs",
    classes: list[str] | None = None, id: str | int | None = None,
) -> dict[str, Any]:
    """A row; values go under "probs" when they are probabilities, else under "logits".
    `id`: the source's id of the image; None gives the filename."""
    row = image_fields(record, index, filename, label, classes, id)
    row["top5"] = None if top is None else [int(i) for i in top]
    row["probs" if scores != "logits" else "logits"] = (
        None if values is None else [float(p) for p in values])
    row["scores"] = scores
    row["error"] = error
    return row


def image_fields(record: str, index: int, filename: str, label: int,
                 classes: list[str] | None = None, id: str | int | None = None,
                 ) -> dict[str, Any]:
    """What every row says of its image: where it is, its id, its label (and class)."""
    row: dict[str, Any] = {
        "record": record,
        "index": index,
        "filename": filename,
        "id": filename if id is None else id,
        "label": None if label < 0 else int(label),
    }
    if classes is not None:
        row["class_name"] = classes[label] if 0 <= label < len(classes) else None
    return row


def embedding_row(record: str, index: int, filename: str, label: int,
                  error: dict[str, str] | None, classes: list[str] | None = None,
                  id: str | int | None = None) -> dict[str, Any]:
    """A row of an embeddings job (`run --output embeddings`): the image and its error, no
    scores. Its vector is row `index` of `<job>/embeddings/<record>.npy`, NaN for a failed
    image; the row, not the vector, says whether the image was served."""
    return {**image_fields(record, index, filename, label, classes, id),
            "output": "embeddings", "error": error}


def parse_classes(data: bytes, where: str) -> list[str]:
    """Class names from a labels.json (index = label): a JSON list of strings. Anything
    else is a ValueError naming the object: a mistake in the store, not one that a retry
    can mend."""
    try:
        classes = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{where}: expected a JSON list of class names, got "
                         f"{type(classes).__name__}")
    return classes


def parse_meta(data: bytes, where: str) -> dict[str, Any]:
    """A record's meta (what stage 0 found: names, labels, per-image errors), checked."""
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not JSON: {exc}") from exc
    ok = (isinstance(meta, dict) and isinstance(meta.get("n"), int)
          and isinstance(meta.get("filenames"), list) and isinstance(meta.get("labels"), list)
          and isinstance(meta.get("errors", {}), dict)
          and len(meta["filenames"]) == len(meta["labels"]) == meta["n"]
          and all(isinstance(x, int) for x in meta["labels"]))
    ids = meta.get("ids") if ok else None
    if ids is not None and not (isinstance(ids, list) and len(ids) == meta["n"] and all(
            isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))
            for x in ids)):
        ok = False
    if not ok:
        raise ValueError(f"{where}: not a record's meta (n, filenames, labels, ids, errors)")
    return meta


def row_id(row: dict[str, Any]) -> str | int | None:
    """A row's id: its own, or the filename in rows written before rows carried ids."""
    return row["id"] if "id" in row else row.get("filename")


def prediction_keys(store: Store, job: str) -> list[str]:
    """The keys of a job's predictions objects, in record name order."""
    return store.list(JobLayout(job).predictions_prefix, ".jsonl")


def record_of(key: str) -> str:
    """The record a predictions key belongs to."""
    return key.rsplit("/", 1)[-1].removesuffix(".jsonl")


def record_rows(store: Store, key: str) -> list[dict[str, Any]]:
    """The rows of one predictions object, as the last stage wrote them."""
    return [json.loads(line) for line in store.get_bytes(key).decode().splitlines()
            if line.strip()]


def iter_records(store: Store, job: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(predictions key, its rows) of every record with predictions, in name order."""
    for key in prediction_keys(store, job):
        yield key, record_rows(store, key)


def read_predictions(store: Store, job: str) -> list[dict[str, Any]]:
    """Every prediction row of a job, record by record, as the last stage wrote them."""
    return [row for _, rows in iter_records(store, job) for row in rows]


def accuracy(store: Store, job: str) -> dict[str, Any] | None:
    """Top-1 and top-5 accuracy over a job's labelled, served images; None without labels.

    Read from the prediction rows in the store (the invocation log has no labels).
    """
    labelled = top1 = top5 = 0
    for row in read_predictions(store, job):
        if row.get("label") is None or row.get("error") or not row.get("top5"):
            continue
        labelled += 1
        top1 += row["top5"][0] == row["label"]
        top5 += row["label"] in row["top5"]
    if not labelled:
        return None
    return {"labelled": labelled, "top1": top1 / labelled, "top5": top5 / labelled}
