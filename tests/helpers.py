"""Checks shared by the end-to-end tests: prediction rows and the whole-model reference."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serveless.images import preprocess
from serveless.pipeline import read_predictions
from serveless.records import read_record
from serveless.store import Store


def rows_of(store: Store, job: str) -> list[dict[str, Any]]:
    """Every prediction row of a job, from the store."""
    return read_predictions(store, job)


def assert_one_row_per_image(rows: list[dict[str, Any]], expected: int) -> None:
    counts = Counter((r["record"], r["index"]) for r in rows)
    assert len(counts) == expected, f"{len(counts)} distinct rows for {expected} images"
    assert max(counts.values()) == 1, "duplicated rows"


def whole_model_probs(model: Any, records_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    """The reference: the whole model in one onnxruntime session, record by record."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {}
    for path in sorted(records_dir.glob("*.tfrecord")):
        examples = read_record(path.read_bytes())
        batch = np.stack([preprocess(ex.encoded) for ex in examples])
        (probs,) = sess.run(None, {"input": batch})
        for i, p in enumerate(probs):
            out[(path.stem, i)] = p
    return out
