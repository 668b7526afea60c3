"""A function's output side: its output object written atomically, with the size and
CRC32C that resume checks it by.

An intermediate stage writes a tensor (`write_tensor`); the last stage writes one
predictions row per image (`write_predictions`, the row format of data/predictions.py),
failed images included, or, in an embeddings job, every image's vector and then its row
(`write_embeddings`). Each object appears only if the whole call succeeded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import google_crc32c
import numpy as np

from ..data.predictions import TOP_K, embedding_row, prediction_row, softmax
from ..data.tensors import TensorFormat, TensorWriter
from ..errors import PredictionCountError
from ..store import Store
from .counters import Counters

MAX_FAILED_LISTED = 10  # failed images (filename, reason) a record's metrics carry


class HashingWriter:
    """Counts and checksums what is written, so resume can check an object is whole.

    CRC32C (as S3 checksums objects), not SHA-256: it catches torn and corrupted writes
    alike, and costs a tenth of the CPU, which is billed: SHA-256 of AlexNet's paper-preset
    intermediates (~350 KB per image) took 0.2-0.5 ms per image.
    """

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.size = 0
        self.crc = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self.crc = google_crc32c.extend(self.crc, bytes(mv))  # it takes read-only bytes only
        self.size += len(mv)
        return self.f.write(mv)

    def hexdigest(self) -> str:
        return f"{self.crc:08x}"

    def flush(self) -> None:
        self.f.flush()


def write_tensor(
    store: Store, key: str, n: int, outputs: Iterator[np.ndarray], fmt: TensorFormat,
    c: Counters, call: Callable[[int], dict[str, str]] | None = None,
    before_publish: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The stage's output tensor; `call` gives, from the object's size, the metadata stored
    with it (the call that wrote it); `before_publish` runs once every block is written and
    before the object appears, so what it writes is there whenever the tensor is."""
    hw: HashingWriter | None = None
    with store.writer(key, _metadata(call, lambda: hw)) as f:
        hw = HashingWriter(f)
        writer: TensorWriter | None = None
        for out in outputs:
            t = time.perf_counter()
            if writer is None:
                writer = TensorWriter(hw, n, tuple(out.shape[1:]), fmt)  # type: ignore[arg-type]
            writer.write(out)
            c.write_ms += (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        if writer is None:
            writer = TensorWriter(hw, 0, (), fmt)  # type: ignore[arg-type]
        writer.close()
        if before_publish is not None:
            before_publish()
    c.write_ms += (time.perf_counter() - t) * 1000
    c.put(hw.size)
    return {"key": key, "size": hw.size, "crc32c": hw.hexdigest()}


def write_predictions(
    store: Store, key: str, record: str, outputs: Iterator[np.ndarray], meta: dict[str, Any],
    c: Counters, scores: str = "probs", classes: list[str] | None = None,
    kept: list[np.ndarray] | None = None, call: Callable[[int], dict[str, str]] | None = None,
) -> tuple[dict[str, Any], list[list[str]]]:
    """One JSONL row per image; returns (the object written, the failed images listed up to
    MAX_FAILED_LISTED with their reasons, for the log and the summary)."""
    errors = meta.get("errors", {})
    filenames, labels = meta["filenames"], meta["labels"]
    # A meta written before ids has none: the filename is the id. Not `get("ids") or`: a
    # one-stage job's meta fills as its blocks are decoded, so the list is empty here.
    ids = meta["ids"] if "ids" in meta else filenames
    index = 0
    failed: list[list[str]] = []
    hw: HashingWriter | None = None
    # the object appears only if the whole block succeeds
    with store.writer(key, _metadata(call, lambda: hw)) as f:
        hw = HashingWriter(f)
        for out in outputs:
            t = time.perf_counter()
            values = out.reshape(len(out), -1)
            if scores == "softmax(logits)":
                values = softmax(values)
            if kept is not None:
                kept.append(values.astype(np.float32))
            k = min(TOP_K, values.shape[1])
            top = np.argsort(-values, axis=1, kind="stable")[:, :k]
            lines = []
            for row in range(len(values)):
                err = errors.get(str(index))
                label = labels[index]
                if err and len(failed) < MAX_FAILED_LISTED:
                    failed.append([filenames[index], err["message"]])
                lines.append(json.dumps(prediction_row(
                    record, index, filenames[index], label,
                    None if err else top[row], None if err else values[row, top[row]], err,
                    scores, classes, ids[index],
                )))
                index += 1
            hw.write(("\n".join(lines) + "\n").encode())
            c.write_ms += (time.perf_counter() - t) * 1000
        if index != meta["n"]:  # inside the writer: a short predictions object is never made
            raise PredictionCountError(
                f"record {record}: {index} predictions for {meta['n']} images")
    c.put(hw.size)
    return {"key": key, "size": hw.size, "crc32c": hw.hexdigest()}, failed


def write_embeddings(
    store: Store, key: str, rows_key: str, record: str, outputs: Iterator[np.ndarray],
    meta: dict[str, Any], c: Counters, dtype: str = "float32",
    classes: list[str] | None = None, call: Callable[[int], dict[str, str]] | None = None,
) -> tuple[dict[str, Any], list[list[str]]]:
    """Every image's vector as one .npy at `key` (n × D, `dtype`, NaN for a failed image),
    then one row per image at `rows_key` (`embedding_row`); returns (the rows object
    written, the failed images listed), as `write_predictions` does.

    The vectors stream to the store a micro-batch at a time behind a header written from
    the record's image count and the first batch's width, so a call's memory does not grow
    with the record (1,000 AlexNet relu7 vectors are 16 MB). The vectors are published
    before the rows: resume takes a record's rows object as its last output, so wherever
    the rows are, the vectors are too."""
    from numpy.lib import format as npy

    errors = meta.get("errors", {})
    filenames, labels = meta["filenames"], meta["labels"]
    ids = meta["ids"] if "ids" in meta else filenames
    n, dt = meta["n"], np.dtype(dtype)
    index = 0
    failed: list[list[str]] = []
    rows: list[str] = []
    with store.writer(key) as f:
        vw = HashingWriter(f)

        def header(width: int) -> None:
            npy.write_array_header_1_0(vw, {"descr": npy.dtype_to_descr(dt),
                                            "fortran_order": False, "shape": (n, width)})

        for out in outputs:
            t = time.perf_counter()
            values = np.array(out.reshape(len(out), -1), dtype=dt)  # a copy: NaNs go in
            if index == 0:
                header(values.shape[1])
            for row in range(len(values)):
                err = errors.get(str(index))
                if err:
                    values[row] = np.nan
                    if len(failed) < MAX_FAILED_LISTED:
                        failed.append([filenames[index], err["message"]])
                rows.append(json.dumps(embedding_row(record, index, filenames[index],
                                                     labels[index], err, classes, ids[index])))
                index += 1
            vw.write(values)
            c.write_ms += (time.perf_counter() - t) * 1000
        if index == 0:
            header(0)
        if index != n:  # inside the writer: short vectors are never published
            raise PredictionCountError(
                f"record {record}: {index} embeddings for {n} images")
    c.put(vw.size)
    t = time.perf_counter()
    hw: HashingWriter | None = None
    with store.writer(rows_key, _metadata(call, lambda: hw)) as f:
        hw = HashingWriter(f)
        hw.write(("\n".join(rows) + "\n").encode() if rows else b"")
    c.write_ms += (time.perf_counter() - t) * 1000
    c.put(hw.size)
    return {"key": rows_key, "size": hw.size, "crc32c": hw.hexdigest()}, failed


def _metadata(call: Callable[[int], dict[str, str]] | None,
              writer: Callable[[], HashingWriter | None]) -> Callable[[], dict[str, str]] | None:
    """The store's metadata callback for an object written through a HashingWriter: the
    call, given the object's size and CRC32C once everything is written."""
    if call is None:
        return None

    def metadata() -> dict[str, str]:
        hw = writer()
        size = hw.size if hw is not None else 0
        return {**call(size), "serveless-crc32c": hw.hexdigest() if hw is not None else ""}

    return metadata
